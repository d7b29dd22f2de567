// Command workflow is a batch workflow written as a Go user writes one against Faktory Enterprise:
// the Go client's batch API for the producer, faktory_worker_go for the worker, nothing of the
// gateway's. Both halves talk to FAKTORY_URL and print one JSON object a line on stdout (the
// worker's own log goes to stderr).
//
//	workflow produce -queue Q   a parent batch (complete and success callbacks) with the jobs
//	                            Step and Spawn, and under it a child batch (complete and success
//	                            callbacks) with Step, Step and Flaky; jobs in Q, callbacks in
//	                            Q-callbacks. Prints the bids, the jids, and the BatchStatus of both
//	                            batches once committed.
//	workflow work -queue Q      a faktory_worker_go Manager (Concurrency 3) on Q-callbacks and Q.
//	                            Prints a record for every job it ran, when its handler returned
//	                            (callbacks: with the BatchStatus read inside the handler); then,
//	                            once the parent's success callback ran and was acknowledged, the
//	                            final BatchStatus of every batch it saw, and exits 0. Exits 1 after
//	                            -timeout without it.
//
// What the handlers do:
//
//	Step      nothing.
//	Spawn     adds one job (Added) to its own, committed, batch with help.Batch, as the
//	          faktory_worker_go documentation shows it: BATCH OPEN, PUSH, no COMMIT.
//	Flaky     fails on its first run (the job has no failure yet), succeeds on its retry.
//	Complete  reads its batch's status; when it shows failed jobs, moves the jobs this process
//	          saw fail from the retry set back to their queue (Faktory's MUTATE requeue): its
//	          retry back-off is 15 s or more, which a test need not wait.
//	Success   reads its batch's status; the root batch's (no _pbid) ends the run.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"sync"
	"time"

	faktory "github.com/contribsys/faktory/client"
	worker "github.com/contribsys/faktory_worker_go"
)

var (
	out   = json.NewEncoder(os.Stdout)
	outMu sync.Mutex
)

// emit prints one record as a line; records from concurrent handlers never interleave.
func emit(record map[string]any) {
	outMu.Lock()
	defer outMu.Unlock()
	if err := out.Encode(record); err != nil {
		log.Fatal(err)
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "workflow: "+format+"\n", args...)
	os.Exit(1)
}

func main() {
	if len(os.Args) < 2 {
		fail("usage: workflow produce|work -queue Q [-timeout D]")
	}
	flags := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	queue := flags.String("queue", "workflow", "the queue of the jobs; callbacks go to <queue>-callbacks")
	timeout := flags.Duration("timeout", time.Minute, "work: give up when the parent's success callback has not run by then")
	_ = flags.Parse(os.Args[2:])
	switch os.Args[1] {
	case "produce":
		produce(*queue)
	case "work":
		os.Exit(work(*queue, *timeout))
	default:
		fail("unknown command %q", os.Args[1])
	}
}

// --- the producer: the Go client's batch API only ---------------------------------------------

func newJob(jobtype, queue string) *faktory.Job {
	job := faktory.NewJob(jobtype)
	job.Args = []any{} // NewJob leaves nil, which Faktory refuses ("jobs must have an args parameter")
	job.Queue = queue
	return job
}

func produce(queue string) {
	cl, err := faktory.Open()
	if err != nil {
		fail("%v", err)
	}
	defer cl.Close()
	callbacks := queue + "-callbacks"
	jobs := map[string][]string{} // bid -> jids pushed, in order
	jobtypes := map[string]string{}

	push := func(b *faktory.Batch, jobtype string) error {
		job := newJob(jobtype, queue)
		if err := b.Push(job); err != nil {
			return err
		}
		jobs[b.Bid] = append(jobs[b.Bid], job.Jid)
		jobtypes[job.Jid] = jobtype
		return nil
	}

	parent := faktory.NewBatch(cl)
	parent.Description = "workflow parent"
	parent.Complete = newJob("Complete", callbacks)
	parent.Success = newJob("Success", callbacks)
	child := faktory.NewBatch(cl)
	child.Description = "workflow child"
	child.Complete = newJob("Complete", callbacks)
	child.Success = newJob("Success", callbacks)

	// Jobs() sends BATCH NEW, runs the function, then BATCH COMMIT: the child is created and
	// committed while its parent is still open, as the Go client's documentation does it.
	err = parent.Jobs(func() error {
		if err := push(parent, "Step"); err != nil {
			return err
		}
		if err := push(parent, "Spawn"); err != nil {
			return err
		}
		child.ParentBid = parent.Bid
		return child.Jobs(func() error {
			for _, jobtype := range []string{"Step", "Step", "Flaky"} {
				if err := push(child, jobtype); err != nil {
					return err
				}
			}
			return nil
		})
	})
	if err != nil {
		fail("producing: %v", err)
	}
	record := map[string]any{
		"event":     "produced",
		"parent":    parent.Bid,
		"child":     child.Bid,
		"jobs":      jobs,
		"jobtypes":  jobtypes,
		"callbacks": map[string]string{"parent_complete": parent.Complete.Jid, "parent_success": parent.Success.Jid, "child_complete": child.Complete.Jid, "child_success": child.Success.Jid},
	}
	for name, bid := range map[string]string{"parent_status": parent.Bid, "child_status": child.Bid} {
		status, err := cl.BatchStatus(bid)
		if err != nil {
			fail("BatchStatus %s: %v", bid, err)
		}
		record[name] = status
	}
	emit(record)
}

// --- the worker: faktory_worker_go ------------------------------------------------------------

type recordKey struct{}

// record is what the middleware prints for one run of a job, once its handler returned.
type record map[string]any

func recordOf(ctx context.Context) record { return ctx.Value(recordKey{}).(record) }

type jobKey struct{}

func jobOf(ctx context.Context) *faktory.Job { return ctx.Value(jobKey{}).(*faktory.Job) }

func customString(job *faktory.Job, key string) string {
	if value, ok := job.GetCustom(key); ok {
		if text, ok := value.(string); ok {
			return text
		}
	}
	return ""
}

func work(queue string, timeout time.Duration) int {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	finished := make(chan struct{})
	var finish sync.Once

	var mu sync.Mutex
	seen := map[string]bool{} // every bid a job or callback named
	var failedJids []string   // jobs this process saw fail, whose retry the next Complete requeues

	mgr := worker.NewManager()
	mgr.Concurrency = 3
	mgr.Logger = &worker.StdLogger{Logger: log.New(os.Stderr, "", log.LstdFlags|log.Lmicroseconds)}
	mgr.ProcessStrictPriorityQueues(queue+"-callbacks", queue)

	mgr.Use(func(ctx context.Context, job *faktory.Job, next func(ctx context.Context) error) error {
		rec := record{
			"event":   "ran",
			"jobtype": job.Type,
			"jid":     job.Jid,
			"bid":     customString(job, "bid"),
			"_bid":    customString(job, "_bid"),
			"_cb":     customString(job, "_cb"),
			"_pbid":   customString(job, "_pbid"),
			"retried": job.Failure != nil,
		}
		mu.Lock()
		for _, key := range []string{"bid", "_bid", "_pbid"} {
			if bid := rec[key].(string); bid != "" {
				seen[bid] = true
			}
		}
		mu.Unlock()
		ctx = context.WithValue(context.WithValue(ctx, recordKey{}, rec), jobKey{}, job)
		err := next(ctx)
		rec["error"] = ""
		if err != nil {
			rec["error"] = err.Error()
		}
		emit(rec)
		return err
	})

	mgr.Register("Step", func(ctx context.Context, args ...any) error { return nil })

	mgr.Register("Spawn", func(ctx context.Context, args ...any) error {
		help := worker.HelperFor(ctx)
		// The faktory_worker_go doc example: reopen this job's batch and push, no commit.
		return help.Batch(func(b *faktory.Batch) error {
			added := newJob("Added", queue)
			if err := b.Push(added); err != nil {
				return err
			}
			rec := recordOf(ctx)
			rec["added"] = added.Jid
			rec["opened"] = b.Bid // BATCH OPEN's reply, which the Go client takes as the bid
			return nil
		})
	})

	mgr.Register("Added", func(ctx context.Context, args ...any) error { return nil })

	mgr.Register("Flaky", func(ctx context.Context, args ...any) error {
		job := jobOf(ctx)
		if job.Failure == nil {
			mu.Lock()
			failedJids = append(failedJids, job.Jid)
			mu.Unlock()
			return errors.New("fails on its first run")
		}
		return nil
	})

	callback := func(ctx context.Context, args ...any) error {
		help := worker.HelperFor(ctx)
		rec := recordOf(ctx)
		bid := help.CallbackBid()
		var status *faktory.BatchStatus
		err := help.With(func(cl *faktory.Client) error {
			var err error
			status, err = cl.BatchStatus(bid)
			if err != nil || status.Failed == 0 || help.JobType() != "Complete" {
				return err
			}
			mu.Lock()
			jids := failedJids
			failedJids = nil
			mu.Unlock()
			if len(jids) == 0 {
				return nil
			}
			rec["requeued"] = jids
			return cl.Requeue(faktory.Retries, faktory.WithJids(jids...))
		})
		if err != nil {
			return err
		}
		rec["status"] = status
		if help.JobType() == "Success" && customString(jobOf(ctx), "_pbid") == "" {
			// The root's success callback: the workflow is over once its ACK went out, which
			// the manager's shutdown waits for.
			finish.Do(func() { close(finished) })
		}
		return nil
	}
	mgr.Register("Complete", callback)
	mgr.Register("Success", callback)

	run, stop := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- mgr.RunWithContext(run) }()
	code := 0
	select {
	case <-finished:
	case <-ctx.Done():
		emit(record{"event": "timeout", "after": timeout.String()})
		code = 1
	}
	stop() // Terminate: no more fetches; every job in hand is finished and acknowledged
	if err := <-done; err != nil {
		fail("running the manager: %v", err)
	}

	cl, err := faktory.Open()
	if err != nil {
		fail("%v", err)
	}
	defer cl.Close()
	for bid := range seen {
		status, err := cl.BatchStatus(bid)
		if err != nil {
			fail("BatchStatus %s: %v", bid, err)
		}
		emit(record{"event": "final", "bid": bid, "status": status})
	}
	return code
}
