// Command kstatus computes the kstatus status of Kubernetes objects, so tests
// can check health the way Flux, cli-utils and kpt do, with the real library.
//
// stdin: a JSON array of objects (as the API server returns them).
// stdout: a JSON array, one {"status": ..., "message": ...} per object, in order,
// from sigs.k8s.io/cli-utils/pkg/kstatus/status.Compute.
// An object Compute rejects ends the command with status 1 and the reason on stderr.
package main

import (
	"encoding/json"
	"fmt"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

type result struct {
	Status  string `json:"status"`
	Message string `json:"message"`
}

func main() {
	var objects []map[string]any
	decoder := json.NewDecoder(os.Stdin)
	decoder.UseNumber()
	if err := decoder.Decode(&objects); err != nil {
		fail("stdin is not a JSON array of objects: %v", err)
	}
	results := make([]result, 0, len(objects))
	for i, object := range objects {
		u := &unstructured.Unstructured{Object: normalize(object).(map[string]any)}
		res, err := status.Compute(u)
		if err != nil {
			fail("object %d (%s %s/%s): %v", i, u.GetKind(), u.GetNamespace(), u.GetName(), err)
		}
		results = append(results, result{Status: res.Status.String(), Message: res.Message})
	}
	if err := json.NewEncoder(os.Stdout).Encode(results); err != nil {
		fail("writing the result: %v", err)
	}
}

// normalize turns json.Number into int64 or float64, the types unstructured
// accessors (NestedInt64 and friends) expect of numbers.
func normalize(value any) any {
	switch v := value.(type) {
	case map[string]any:
		for key, item := range v {
			v[key] = normalize(item)
		}
		return v
	case []any:
		for i, item := range v {
			v[i] = normalize(item)
		}
		return v
	case json.Number:
		if n, err := v.Int64(); err == nil {
			return n
		}
		f, _ := v.Float64()
		return f
	default:
		return v
	}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "kstatus: "+format+"\n", args...)
	os.Exit(1)
}
