# Shared by the bench scripts (sourced, not run): the two-namespace topology
# of design.md section 7, and its removal.
#
#   topo_create A B   namespaces A and B, veth0 198.18.0.1/30 - 198.18.0.2/30
#   topo_destroy A B  kill what runs inside them, then delete them

topo_create() {
    local a=$1 b=$2
    ip netns add "$a"
    ip netns add "$b"
    ip link add veth0 netns "$a" type veth peer name veth0 netns "$b"
    ip -n "$a" addr add 198.18.0.1/30 dev veth0
    ip -n "$b" addr add 198.18.0.2/30 dev veth0
    local ns
    for ns in "$a" "$b"; do
        ip -n "$ns" link set lo up
        ip -n "$ns" link set veth0 up
    done
}

topo_destroy() {
    local ns
    for ns in "$@"; do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true
    done
    for ns in "$@"; do
        ip netns del "$ns" 2>/dev/null || true
    done
}
