// Command kube-controller-manager runs the local cluster's built-in controllers (garbage collector, node lifecycle,
// service accounts, endpoints), built from the k8s.io/kubernetes module.
package main

import (
	"os"

	"k8s.io/component-base/cli"
	"k8s.io/kubernetes/cmd/kube-controller-manager/app"
)

func main() {
	os.Exit(cli.Run(app.NewControllerManagerCommand()))
}
