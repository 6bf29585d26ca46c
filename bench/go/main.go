// Command go-contender drives the Go reference client (github.com/hashicorp/consul/api 1.8.7's
// Lock) over the contender protocol of bench/PROTOCOL.md: JSON command lines on stdin, JSON event
// lines on stdout, diagnostics on stderr.
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
)

// command is any command line; pointers tell an absent field from a zero one.
type command struct {
	Op          string  `json:"op"`
	ID          *uint64 `json:"id"`
	Addr        string  `json:"addr"`
	Key         string  `json:"key"`
	TTLMs       *uint64 `json:"ttl_ms"`
	LockDelayMs *uint64 `json:"lock_delay_ms"`
	Shared      bool    `json:"shared_client"`
	WriteMs     *uint64 `json:"write_ms"`
}

type event struct {
	Ev      string  `json:"ev"`
	ID      *uint64 `json:"id,omitempty"`
	TNs     int64   `json:"t_ns,omitempty"`
	Session string  `json:"session,omitempty"`
	Seq     *uint64 `json:"seq,omitempty"`
	Msg     string  `json:"msg,omitempty"`
}

var outMu sync.Mutex

// emit writes one event line. Every goroutine writes through here, so lines never interleave;
// stdout is unbuffered, so each line leaves at once.
func emit(e event) {
	b, err := json.Marshal(e)
	if err != nil {
		fmt.Fprintf(os.Stderr, "go-contender: cannot encode %#v: %v\n", e, err)
		return
	}
	outMu.Lock()
	defer outMu.Unlock()
	os.Stdout.Write(append(b, '\n'))
}

func now() int64 { return time.Now().UnixNano() }

func emitAt(ev string, id uint64, t int64) { emit(event{Ev: ev, ID: &id, TNs: t}) }

func emitErr(id *uint64, format string, args ...interface{}) {
	emit(event{Ev: "error", ID: id, Msg: fmt.Sprintf(format, args...)})
}

// process is the state of this contender process.
type process struct {
	mu         sync.Mutex
	quitting   bool
	contenders map[uint64]*contender // waiting or held; an id leaves when it unlocks or loses
	shared     map[string]*api.Client
	running    sync.WaitGroup // every contender's goroutine
}

func main() {
	p := &process{contenders: map[uint64]*contender{}, shared: map[string]*api.Client{}}
	emit(event{Ev: "ready", TNs: now()})
	// bufio.Reader rather than Scanner: no line-length limit to trip over.
	in := bufio.NewReader(os.Stdin)
	for {
		line, err := in.ReadBytes('\n')
		if len(line) > 0 && !p.handle(line) {
			break
		}
		if err != nil {
			if err != io.EOF {
				fmt.Fprintf(os.Stderr, "go-contender: reading stdin: %v\n", err)
			}
			break // end of input means quit
		}
	}
	p.quit()
	emit(event{Ev: "bye"})
}

// handle runs one command line; false means quit.
func (p *process) handle(line []byte) bool {
	if len(trimSpace(line)) == 0 {
		return true
	}
	var c command
	if err := json.Unmarshal(line, &c); err != nil {
		emitErr(nil, "bad command line: %v", err)
		return true
	}
	switch c.Op {
	case "quit":
		return false
	case "lock":
		p.lock(&c)
	case "unlock":
		if c.ID == nil {
			emitErr(nil, "unlock: missing id")
			return true
		}
		p.unlock(*c.ID)
	default:
		emitErr(c.ID, "unknown op %q", c.Op)
	}
	return true
}

func trimSpace(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == '\r' || b[len(b)-1] == ' ' || b[len(b)-1] == '\t') {
		b = b[:len(b)-1]
	}
	return b
}

// client gives a contender its own client (connection pool), as a separate process would have,
// or the one shared by the process's sharing contenders of that address.
func (p *process) client(addr string, shared bool) (*api.Client, error) {
	if !shared {
		return newClient(addr)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if c, ok := p.shared[addr]; ok {
		return c, nil
	}
	c, err := newClient(addr)
	if err == nil {
		p.shared[addr] = c
	}
	return c, err
}

func newClient(addr string) (*api.Client, error) {
	cfg := api.DefaultConfig()
	cfg.Address = addr
	return api.NewClient(cfg)
}

// quit releases what is held and stops the acquirers, then waits for them.
func (p *process) quit() {
	p.mu.Lock()
	p.quitting = true
	all := make([]*contender, 0, len(p.contenders))
	for _, c := range p.contenders {
		all = append(all, c)
	}
	p.mu.Unlock()
	for _, c := range all {
		c.stop()
	}
	done := make(chan struct{})
	go func() { p.running.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(time.Second):
		// Lock looks at stopCh only between its blocking reads of the key (up to
		// LockWaitTime, 15 s, plus Consul's jitter), so a waiter can take that long to notice.
		fmt.Fprintln(os.Stderr, "go-contender: waiting for acquirers to notice the stop (up to ~16 s)")
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			fmt.Fprintln(os.Stderr, "go-contender: giving up on the remaining acquirers")
		}
	}
}
