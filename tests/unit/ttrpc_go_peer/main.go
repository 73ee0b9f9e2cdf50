// Command ttrpc_go_peer is the Go half of test_ttrpc_go_interop.py: it runs
// containerd's own ttrpc (the Debian golang-github-containerd-ttrpc sources)
// as a server or a client against our Python implementation.
//
//	ttrpc_go_peer server SOCKET   serve interop.Echo on SOCKET, print "ready"
//	ttrpc_go_peer client SOCKET   call interop.Echo on SOCKET, one line per case
//
// Payloads are ttrpc.KeyValue messages, which keeps the program free of
// generated code.
package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/containerd/ttrpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: ttrpc_go_peer server|client SOCKET")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "server":
		runServer(os.Args[2])
	case "client":
		runClient(os.Args[2])
	default:
		os.Exit(2)
	}
}

func runServer(socket string) {
	srv, err := ttrpc.NewServer()
	if err != nil {
		panic(err)
	}
	srv.Register("interop.Echo", map[string]ttrpc.Method{
		"Echo": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var in ttrpc.KeyValue
			if err := unmarshal(&in); err != nil {
				return nil, err
			}
			ns, _ := ttrpc.GetMetadataValue(ctx, "containerd-namespace-ttrpc")
			_, deadline := ctx.Deadline()
			out := fmt.Sprintf("%s|ns=%s|deadline=%v", in.Value, ns, deadline)
			return &ttrpc.KeyValue{Key: strings.ToUpper(in.Key), Value: out}, nil
		},
		"Sleep": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			var in ttrpc.KeyValue
			if err := unmarshal(&in); err != nil {
				return nil, err
			}
			d, err := time.ParseDuration(in.Value)
			if err != nil {
				return nil, status.Errorf(codes.InvalidArgument, "bad duration %q", in.Value)
			}
			select {
			case <-time.After(d):
				return &in, nil
			case <-ctx.Done():
				return nil, ctx.Err()
			}
		},
		"Fail": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			return nil, status.Errorf(codes.NotFound, "no such thing")
		},
		"Huge": func(ctx context.Context, unmarshal func(interface{}) error) (interface{}, error) {
			return &ttrpc.KeyValue{Value: strings.Repeat("h", 5<<20)}, nil
		},
	})
	l, err := net.Listen("unix", socket)
	if err != nil {
		panic(err)
	}
	fmt.Println("ready")
	_ = srv.Serve(context.Background(), l)
}

func runClient(socket string) {
	conn, err := net.Dial("unix", socket)
	if err != nil {
		panic(err)
	}
	c := ttrpc.NewClient(conn)
	defer c.Close()
	md := ttrpc.MD{"containerd-namespace-ttrpc": {"k8s.io"}}
	ctx := ttrpc.WithMetadata(context.Background(), md)

	call := func(name string, ctx context.Context, method string, in *ttrpc.KeyValue) {
		var out ttrpc.KeyValue
		if err := c.Call(ctx, "interop.Echo", method, in, &out); err != nil {
			st, _ := status.FromError(err)
			fmt.Printf("%s err %s %s\n", name, st.Code(), st.Message())
			return
		}
		fmt.Printf("%s ok %s %d %s\n", name, out.Key, len(out.Value), firstPart(out.Value))
	}

	call("echo", ctx, "Echo", &ttrpc.KeyValue{Key: "hello", Value: "world"})
	tctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	call("deadline", tctx, "Echo", &ttrpc.KeyValue{Key: "t", Value: "v"})
	cancel()
	call("nomethod", ctx, "Nope", &ttrpc.KeyValue{})
	var out ttrpc.KeyValue
	err = c.Call(ctx, "interop.Nope", "Echo", &ttrpc.KeyValue{}, &out)
	st, _ := status.FromError(err)
	fmt.Printf("noservice err %s %s\n", st.Code(), st.Message())
	call("fail", ctx, "Fail", &ttrpc.KeyValue{})
	call("big", ctx, "Echo", &ttrpc.KeyValue{Key: "big", Value: strings.Repeat("x", 3<<20)})
	call("huge", ctx, "Echo", &ttrpc.KeyValue{Key: "huge", Value: strings.Repeat("x", 5<<20)})
	call("afterhuge", ctx, "Echo", &ttrpc.KeyValue{Key: "after", Value: "huge"})

	// A slow call must not hold back fast ones on the same connection.
	var wg sync.WaitGroup
	var mu sync.Mutex
	var order []string
	record := func(s string) { mu.Lock(); order = append(order, s); mu.Unlock() }
	wg.Add(1)
	go func() {
		defer wg.Done()
		var o ttrpc.KeyValue
		if err := c.Call(ctx, "interop.Echo", "Sleep", &ttrpc.KeyValue{Value: "300ms"}, &o); err != nil {
			record("slow-error")
			return
		}
		record("slow")
	}()
	time.Sleep(50 * time.Millisecond)
	for i := 0; i < 2; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var o ttrpc.KeyValue
			if err := c.Call(ctx, "interop.Echo", "Echo", &ttrpc.KeyValue{Key: "f"}, &o); err != nil {
				record("fast-error")
				return
			}
			record("fast")
		}()
	}
	wg.Wait()
	fmt.Printf("order %s\n", strings.Join(order, ","))
}

func firstPart(s string) string {
	if len(s) > 64 {
		return s[:8]
	}
	return s
}
