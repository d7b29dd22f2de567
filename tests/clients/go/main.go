// Command violate465 drives the Go client's batch API against FAKTORY_URL the way a user would hit
// contribsys/faktory#465: it builds and commits a batch, then tries, from outside the batch, to
// reopen it, push into it, hang a child batch under it, and bulk-push into it. It prints one JSON
// object: each attempt's error text, or "" when the server accepted it.
package main

import (
	"encoding/json"
	"fmt"
	"os"

	faktory "github.com/contribsys/faktory/client"
)

func errText(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
}

func main() {
	cl, err := faktory.Open()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	defer cl.Close()

	batch := faktory.NewBatch(cl)
	batch.Description = "go client #465"
	batch.Success = faktory.NewJob("Done")
	batch.Success.Queue = "go-callbacks"
	if err := batch.Jobs(func() error { return batch.Push(faktory.NewJob("Work", 1)) }); err != nil {
		fmt.Fprintln(os.Stderr, "building the batch:", err)
		os.Exit(1)
	}

	results := map[string]string{"bid": batch.Bid}
	_, err = cl.BatchOpen(batch.Bid)
	results["reopen"] = errText(err)

	late := faktory.NewJob("Work", 2)
	late.SetCustom("bid", batch.Bid)
	results["push"] = errText(cl.Push(late))

	child := faktory.NewBatch(cl)
	child.ParentBid = batch.Bid
	child.Success = faktory.NewJob("ChildDone")
	_, err = cl.BatchNew(child)
	results["child"] = errText(err)

	bulk := faktory.NewJob("Work", 3)
	bulk.SetCustom("bid", batch.Bid)
	failed, err := cl.PushBulk([]*faktory.Job{bulk})
	results["pushbulk"] = errText(err)
	if len(failed) > 0 {
		results["pushbulk"] = failed[bulk.Jid]
	}

	out, _ := json.Marshal(results)
	fmt.Println(string(out))
}
