package main

import (
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/hashicorp/consul/api"
)

const (
	waiting = iota
	held
	releasing // our own unlock (or quit) has begun: a closing leader channel is not a loss
	over
)

// contender is one lock of the Go client, from `lock` until it is released or lost.
type contender struct {
	p      *process
	id     uint64
	key    string
	ttl    string // Go duration string, as LockOptions.SessionTTL and RenewPeriodic take it
	client *api.Client
	// With write_ms: how often a holder reports a write to the fenced resource.
	writeEvery time.Duration

	stopCh   chan struct{} // closing it abandons the acquisition (Lock's stopCh)
	stopOnce sync.Once
	released chan struct{} // closed when our own release has finished

	// Only with lock_delay_ms: the session we create and renew ourselves.
	custom      bool
	lockDelay   time.Duration
	renewDone   chan struct{} // closing it makes RenewPeriodic destroy the session
	renewExited chan struct{}
	endOnce     sync.Once

	mu      sync.Mutex
	state   int
	lock    *api.Lock
	session string
}

func (p *process) lock(cmd *command) {
	if cmd.ID == nil {
		emitErr(nil, "lock: missing id")
		return
	}
	id := *cmd.ID
	switch {
	case cmd.Addr == "":
		emitErr(&id, "lock: missing addr")
		return
	case cmd.Key == "":
		emitErr(&id, "lock: missing key")
		return
	case cmd.TTLMs == nil || *cmd.TTLMs == 0:
		emitErr(&id, "lock: missing or zero ttl_ms")
		return
	}
	client, err := p.client(cmd.Addr, cmd.Shared)
	if err != nil {
		emitErr(&id, "lock: client for %s: %v", cmd.Addr, err)
		return
	}
	c := &contender{
		p:        p,
		id:       id,
		key:      cmd.Key,
		ttl:      (time.Duration(*cmd.TTLMs) * time.Millisecond).String(),
		client:   client,
		stopCh:   make(chan struct{}),
		released: make(chan struct{}),
	}
	if cmd.WriteMs != nil {
		c.writeEvery = time.Duration(*cmd.WriteMs) * time.Millisecond
	}
	if cmd.LockDelayMs != nil {
		c.custom = true
		c.lockDelay = time.Duration(*cmd.LockDelayMs) * time.Millisecond
		c.renewDone = make(chan struct{})
		c.renewExited = make(chan struct{})
	}
	p.mu.Lock()
	if _, busy := p.contenders[id]; busy {
		p.mu.Unlock()
		emitErr(&id, "lock: contender %d is already waiting or holding", id)
		return
	}
	p.contenders[id] = c
	p.running.Add(1)
	p.mu.Unlock()
	go c.run()
}

func (p *process) unlock(id uint64) {
	p.mu.Lock()
	c := p.contenders[id]
	p.mu.Unlock()
	if c == nil {
		emitErr(&id, "unlock: contender %d is neither waiting nor holding", id)
		return
	}
	c.mu.Lock()
	if c.state != held {
		c.mu.Unlock()
		emitErr(&id, "unlock: contender %d does not hold its lock yet", id)
		return
	}
	c.state = releasing
	c.mu.Unlock()
	p.forget(c)
	// Off the command loop: other contenders' commands must not queue behind this HTTP call.
	p.running.Add(1)
	go func() {
		defer p.running.Done()
		c.release(true)
	}()
}

func (p *process) forget(c *contender) {
	p.mu.Lock()
	if p.contenders[c.id] == c {
		delete(p.contenders, c.id)
	}
	p.mu.Unlock()
}

// run acquires, reports, and watches for a loss, as a Go user of Lock does.
func (c *contender) run() {
	defer c.p.running.Done()
	defer c.p.forget(c)
	opts := &api.LockOptions{Key: c.key, SessionTTL: c.ttl}
	if c.custom {
		if err := c.createSession(); err != nil {
			emitErr(&c.id, "lock: creating the session: %v", err)
			return
		}
		opts = &api.LockOptions{Key: c.key, Session: c.session}
	}
	lock, err := c.client.LockOpts(opts)
	if err != nil {
		emitErr(&c.id, "lock: %v", err)
		c.endSession(false)
		return
	}
	leaderCh, err := lock.Lock(c.stopCh)
	t := now()
	if err != nil {
		emitErr(&c.id, "lock: %v", err)
		c.endSession(false)
		return
	}
	if leaderCh == nil { // stopped by quit before acquiring
		c.endSession(true)
		if !c.custom {
			// Lock's own session (whose id it keeps to itself) is destroyed by its renewal
			// goroutine once Lock gives up; give that one local request time before we exit.
			time.Sleep(200 * time.Millisecond)
		}
		return
	}
	// Lock creates its session privately; the key names it. Go's Lock gives no fencing token:
	// a user who wants one reads the key after Lock returns, as here (consistently, so that a
	// stale follower cannot answer), and takes its ModifyIndex if the session is still its own.
	// Read after t was taken, so the read's latency does not count.
	var seq uint64
	if pair, _, err := c.client.KV().Get(c.key, &api.QueryOptions{RequireConsistent: true}); err != nil || pair == nil {
		fmt.Fprintf(os.Stderr, "go-contender: %d: reading the holder of %s: %v\n", c.id, c.key, err)
	} else {
		if !c.custom {
			c.session = pair.Session
		}
		if pair.Session == c.session {
			seq = pair.ModifyIndex
		}
	}
	c.mu.Lock()
	c.lock = lock
	select {
	case <-c.stopCh: // quit came while Lock was returning: give it back at once
		c.state = releasing
		c.mu.Unlock()
		c.release(false)
		return
	default:
	}
	c.state = held
	// Under c.mu, so an `unlock` cannot report `unlocking` before this `held`.
	emit(event{Ev: "held", ID: &c.id, TNs: t, Session: c.session, Seq: &seq})
	c.mu.Unlock()

	var writes <-chan time.Time
	if c.writeEvery > 0 {
		ticker := time.NewTicker(c.writeEvery)
		defer ticker.Stop()
		writes = ticker.C
	}
wait:
	for {
		select {
		case <-leaderCh:
			break wait
		case <-c.released:
			return
		case <-writes:
			// A write while the leader channel is still open: what a Go user's worker does.
			c.mu.Lock()
			if c.state == held {
				emit(event{Ev: "write", ID: &c.id, TNs: now(), Seq: &seq})
			}
			c.mu.Unlock()
		}
	}
	// The leader channel also closes after our own Unlock (the monitor sees the released key),
	// so only a close while still `held` is a loss.
	t = now()
	c.mu.Lock()
	lost := c.state == held
	if lost {
		c.state = over
	}
	c.mu.Unlock()
	if !lost {
		<-c.released
		return
	}
	emitAt("lost", c.id, t)
	// The Lock still thinks it holds (and, on the plain path, still renews its session): Unlock
	// stops that; releasing a key we no longer hold is harmless.
	lock.Unlock()
	c.endSession(false)
}

// release unlocks; with events for an `unlock` command, silently at quit.
func (c *contender) release(events bool) {
	defer close(c.released)
	if events {
		emitAt("unlocking", c.id, now())
	}
	err := c.lock.Unlock()
	c.endSession(!events)
	t := now()
	switch {
	case err != nil:
		emitErr(&c.id, "unlock: %v", err)
	case events:
		emitAt("unlocked", c.id, t)
	}
}

// stop is quit's part: abandon the acquisition, or release what is held.
func (c *contender) stop() {
	c.stopOnce.Do(func() { close(c.stopCh) })
	c.mu.Lock()
	if c.state != held {
		c.mu.Unlock()
		return
	}
	c.state = releasing
	c.mu.Unlock()
	c.p.running.Add(1)
	go func() {
		defer c.p.running.Done()
		c.release(false)
	}()
}

// createSession makes the session a Go user needs for a custom lock-delay, and starts renewing it.
func (c *contender) createSession() error {
	var err error
	if c.lockDelay == 0 {
		// Session.Create leaves out a zero LockDelay, so Consul would apply its default 15 s;
		// a Go user wanting none has to send the field themselves.
		var out struct{ ID string }
		body := map[string]interface{}{
			"Name": api.DefaultLockSessionName, "TTL": c.ttl, "LockDelay": "0s",
			"Behavior": api.SessionBehaviorRelease,
		}
		_, err = c.client.Raw().Write("/v1/session/create", body, &out, nil)
		c.session = out.ID
	} else {
		c.session, _, err = c.client.Session().Create(&api.SessionEntry{
			Name: api.DefaultLockSessionName, TTL: c.ttl, LockDelay: c.lockDelay,
			Behavior: api.SessionBehaviorRelease,
		}, nil)
	}
	if err != nil {
		return err
	}
	go func() {
		defer close(c.renewExited)
		if err := c.client.Session().RenewPeriodic(c.ttl, c.session, nil, c.renewDone); err != nil {
			fmt.Fprintf(os.Stderr, "go-contender: %d: renewing session %s: %v\n", c.id, c.session, err)
		}
	}()
	return nil
}

// endSession ends the contender's session. Our own session: closing renewDone makes
// RenewPeriodic destroy it. Lock's own session: Unlock (or a stopped Lock) already closed its
// renewal, which destroys it in the background; when the process is about to exit (wait), destroy
// it here too so that it cannot outlive us.
func (c *contender) endSession(wait bool) {
	if c.custom {
		c.endOnce.Do(func() { close(c.renewDone) })
		if wait {
			<-c.renewExited
		}
		return
	}
	if wait && c.session != "" {
		if _, err := c.client.Session().Destroy(c.session, nil); err != nil {
			fmt.Fprintf(os.Stderr, "go-contender: %d: destroying session %s: %v\n", c.id, c.session, err)
		}
	}
}
