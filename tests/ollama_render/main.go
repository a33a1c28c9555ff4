// ollama_render renders Ollama TEMPLATEs with Go's real text/template, applying the rules Ollama applies before
// its template runs (server/routes.go and template/template.go, read for facts, not copied):
//
//   - the Modelfile SYSTEM is prepended as a system message when the request does not start with one;
//   - consecutive messages of one role are merged, joined by "\n\n"; .System is all system messages joined by
//     "\n\n", and the system messages also stay in .Messages;
//   - a template that mentions .Messages runs once over the whole conversation with Response "";
//   - no BOS is printed here: the runtime adds it when tokenizing.
//
// Templates that do not use .Messages (Ollama's legacy per-turn mode) are refused: l3zh-local never writes them.
//
// Input on stdin, JSON: {"template": "...", "system": "...", "conversations": [[{"role","content"}...], ...]}.
// Output on stdout, JSON: {"prompts": ["...", ...]} or {"error": "..."}.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type request struct {
	Template      string      `json:"template"`
	System        string      `json:"system"`
	Conversations [][]Message `json:"conversations"`
}

// identifiers lists the field and variable names a template refers to.
func identifiers(node parse.Node) []string {
	var names []string
	switch n := node.(type) {
	case *parse.ListNode:
		if n == nil {
			return nil
		}
		for _, child := range n.Nodes {
			names = append(names, identifiers(child)...)
		}
	case *parse.ActionNode:
		names = identifiers(n.Pipe)
	case *parse.TemplateNode:
		if n.Pipe != nil {
			names = identifiers(n.Pipe)
		}
	case *parse.IfNode:
		names = branchIdentifiers(&n.BranchNode)
	case *parse.RangeNode:
		names = branchIdentifiers(&n.BranchNode)
	case *parse.WithNode:
		names = branchIdentifiers(&n.BranchNode)
	case *parse.PipeNode:
		for _, cmd := range n.Cmds {
			for _, arg := range cmd.Args {
				names = append(names, identifiers(arg)...)
			}
		}
	case *parse.FieldNode:
		names = n.Ident
	case *parse.ChainNode:
		names = append(identifiers(n.Node), n.Field...)
	}
	return names
}

func branchIdentifiers(b *parse.BranchNode) []string {
	names := identifiers(b.Pipe)
	names = append(names, identifiers(b.List)...)
	if b.ElseList != nil {
		names = append(names, identifiers(b.ElseList)...)
	}
	return names
}

func usesMessages(t *template.Template) bool {
	for _, name := range identifiers(t.Tree.Root) {
		if strings.EqualFold(name, "Messages") {
			return true
		}
	}
	return false
}

// collate merges consecutive messages of one role and joins the system messages.
func collate(msgs []Message) (string, []Message) {
	var system []string
	var out []Message
	for _, m := range msgs {
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if len(out) > 0 && out[len(out)-1].Role == m.Role {
			out[len(out)-1].Content += "\n\n" + m.Content
		} else {
			out = append(out, m)
		}
	}
	return strings.Join(system, "\n\n"), out
}

func render(t *template.Template, modelSystem string, msgs []Message) (string, error) {
	if modelSystem != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
		msgs = append([]Message{{Role: "system", Content: modelSystem}}, msgs...)
	}
	system, collated := collate(msgs)
	var b bytes.Buffer
	err := t.Execute(&b, map[string]any{"System": system, "Messages": collated, "Response": ""})
	return b.String(), err
}

func fail(err error) {
	json.NewEncoder(os.Stdout).Encode(map[string]string{"error": err.Error()})
	os.Exit(1)
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fail(err)
	}
	t, err := template.New("").Parse(req.Template)
	if err != nil {
		fail(err)
	}
	if !usesMessages(t) {
		fail(fmt.Errorf("template does not use .Messages (legacy per-turn templates are not supported)"))
	}
	prompts := make([]string, 0, len(req.Conversations))
	for _, conv := range req.Conversations {
		p, err := render(t, req.System, conv)
		if err != nil {
			fail(err)
		}
		prompts = append(prompts, p)
	}
	json.NewEncoder(os.Stdout).Encode(map[string]any{"prompts": prompts})
}
