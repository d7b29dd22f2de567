// Command jobjson shows how Go's encoding/json, the library Faktory's server and Go client use,
// writes and reads jobs, for the gateway's tests to compare with its own reading.
//
//	jobjson encode   prints PUSH and PUSHB lines exactly as the Go client writes them (json.Marshal
//	                 of client.Job: <, >, & escaped as \u003c..., non-ASCII text as UTF-8)
//	jobjson read     reads one base64 payload a line and prints, a line each, what Faktory's PUSH
//	                 handler reads from it (server/commands.go:214-217: json.Unmarshal into a
//	                 client.Job): whether it decodes, custom.bid and the reserved custom keys
package main

import (
	"bufio"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"

	faktory "github.com/contribsys/faktory/client"
)

func job(jid string, args ...any) *faktory.Job {
	j := faktory.NewJob("Html<Job>", args...)
	j.Jid = jid
	j.Queue = "go-encoded"
	j.CreatedAt = "2026-01-02T03:04:05.123456Z"
	return j
}

func encode() {
	texts := []any{
		"<script>alert('x & y')</script>",
		"café naïve Ünïcödé ✓ 日本語 🚀",
		map[string]any{"html": "<b>&amp;</b>", "quote": "\"'", "tab": "a\tb", "nul": "\u0000", "ls": "\u2028\u2029"},
		[]any{1.5, -2, true, nil, "→←"},
	}
	jobs := []*faktory.Job{}
	for i, text := range texts {
		j := job(fmt.Sprintf("go-enc-%04d", i), text, i)
		j.SetCustom("note", "<&> é")
		j.SetCustom("trace", map[string]any{"span": "ü<1>"})
		jobs = append(jobs, j)
	}
	for _, j := range jobs {
		data, err := json.Marshal(j)
		if err != nil {
			panic(err)
		}
		fmt.Printf("PUSH %s\n", data)
	}
	bulk := []*faktory.Job{job("go-enc-bulk-1", "<x>"), job("go-enc-bulk-2", "ÿ & ü")}
	data, err := json.Marshal(bulk)
	if err != nil {
		panic(err)
	}
	fmt.Printf("PUSHB %s\n", data)
}

type reading struct {
	OK       bool     `json:"ok"`
	Bid      any      `json:"bid"`
	Reserved []string `json:"reserved"`
}

func read() {
	scanner := bufio.NewScanner(os.Stdin)
	scanner.Buffer(make([]byte, 1<<20), 1<<26)
	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	for scanner.Scan() {
		payload, err := base64.StdEncoding.DecodeString(scanner.Text())
		if err != nil {
			panic(err)
		}
		var j faktory.Job
		result := reading{Reserved: []string{}}
		if json.Unmarshal(payload, &j) == nil {
			result.OK = true
			result.Bid = j.Custom["bid"]
			for _, key := range []string{"_bid", "_pbid", "_cb"} {
				if _, ok := j.Custom[key]; ok {
					result.Reserved = append(result.Reserved, key)
				}
			}
		}
		line, err := json.Marshal(result)
		if err != nil {
			panic(err)
		}
		fmt.Fprintf(out, "%s\n", line)
	}
	if err := scanner.Err(); err != nil {
		panic(err)
	}
}

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: jobjson encode|read")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "encode":
		encode()
	case "read":
		read()
	default:
		fmt.Fprintln(os.Stderr, "usage: jobjson encode|read")
		os.Exit(2)
	}
}
