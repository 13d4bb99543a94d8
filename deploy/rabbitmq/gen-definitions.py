#!/usr/bin/python3
"""Broker definitions with N shard queues for several vmproxy-consumer
instances.

    gen-definitions.py --shards 8 [--base definitions.json] [--keep-all-queue] > defs.json

Starts from the base definitions (users, vhost, the vm.metrics exchange)
and adds:
  - exchange vm.metrics.shards of type x-consistent-hash (the
    rabbitmq_consistent_hash_exchange plugin), hashing the x-vm-uuid header
    vmproxyd stamps on every message, bound to vm.metrics with "#": all of a
    VM's samples go to one shard, in order;
  - quorum queues vm.metrics.shard.0 .. vm.metrics.shard.N-1 with
    x-single-active-consumer, each bound with weight "1".
The single queue vm.metrics.all is dropped unless --keep-all-queue: nothing
would consume it and it would grow without bound.
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def shard_definitions(base, shards, prefix="vm.metrics.shard.", keep_all=False):
    d = json.loads(json.dumps(base))
    vhost = d["vhosts"][0]["name"]
    src = d["exchanges"][0]["name"]  # vm.metrics
    hx = src + ".shards"
    if not keep_all:
        gone = {q["name"] for q in d["queues"]}
        d["queues"] = []
        d["bindings"] = [b for b in d["bindings"]
                         if not (b["destination_type"] == "queue" and b["destination"] in gone)]
    d["exchanges"] = [e for e in d["exchanges"] if e["name"] != hx]
    d["exchanges"].append({"name": hx, "vhost": vhost, "type": "x-consistent-hash",
                           "durable": True, "auto_delete": False, "internal": False,
                           "arguments": {"hash-header": "x-vm-uuid"}})
    d["bindings"].append({"source": src, "vhost": vhost, "destination": hx,
                          "destination_type": "exchange", "routing_key": "#", "arguments": {}})
    for i in range(shards):
        q = "%s%d" % (prefix, i)
        d["queues"].append({"name": q, "vhost": vhost, "durable": True, "auto_delete": False,
                            "arguments": {"x-queue-type": "quorum",
                                          "x-single-active-consumer": True}})
        # The routing key of a consistent-hash binding is its weight.
        d["bindings"].append({"source": hx, "vhost": vhost, "destination": q,
                              "destination_type": "queue", "routing_key": "1",
                              "arguments": {}})
    return d


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, required=True, help="number of shard queues (1-1024)")
    ap.add_argument("--base", default=os.path.join(HERE, "definitions.json"))
    ap.add_argument("--prefix", default="vm.metrics.shard.")
    ap.add_argument("--keep-all-queue", action="store_true",
                    help="keep the base's single queue (vm.metrics.all) too")
    a = ap.parse_args()
    if not 1 <= a.shards <= 1024:
        ap.error("--shards: expected 1 to 1024")
    with open(a.base) as f:
        base = json.load(f)
    json.dump(shard_definitions(base, a.shards, a.prefix, a.keep_all_queue), sys.stdout,
              indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
