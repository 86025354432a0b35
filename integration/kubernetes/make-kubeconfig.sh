#!/bin/sh
# Writes the kubeconfig the agents use, from the token Secret of rbac.yaml.
#   ./make-kubeconfig.sh > kubeconfig
# Install it on each host as /etc/acl-update/kubeconfig (mode 0600, root), usually through the
# image's provisioning (Ignition, cloud-init), and set [kubernetes] kubeconfig to that path.
set -eu
ns=acl-update
secret=acl-update-agent-token
server=$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')
ca=$(kubectl -n "$ns" get secret "$secret" -o jsonpath='{.data.ca\.crt}')
token=$(kubectl -n "$ns" get secret "$secret" -o jsonpath='{.data.token}' | base64 -d)
[ -n "$token" ] || { echo "no token in secret $ns/$secret yet (apply rbac.yaml first)" >&2; exit 1; }
cat <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
  - name: cluster
    cluster:
      server: $server
      certificate-authority-data: $ca
users:
  - name: acl-update-agent
    user:
      token: $token
contexts:
  - name: acl-update-agent
    context: {cluster: cluster, user: acl-update-agent}
current-context: acl-update-agent
KUBECONFIG
