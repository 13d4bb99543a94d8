"""The whole system: three simulated VMs run vmproxy-agent through
vmproxyd (TLS, EXTERNAL) to the broker, and vmproxy-consumer stores their
samples, each under the VM identity the proxy observed, their numbers as
readable as the agent wrote them (two decimals, no binary tails)."""
import glob
import json
import os
import re

from harness import stop_all, wait_for
from harness.vmproxyd import VmProxyd, make_vms
from test_agent import Agent
from test_consumer import Consumer


def test_agents_through_proxy_to_consumer(build_dir, broker, certs, tmp_path):
    vms = make_vms(3, base="127.10.30.1")
    proxy = VmProxyd(build_dir, tmp_path, broker, certs, vms, threads=2).start()
    consumer = Consumer(build_dir, broker, certs, tmp_path, "vm.metrics.e2e").start()
    agents = []
    try:
        for v in vms:
            agents.append(Agent(build_dir, proxy, v, tmp_path / ("spool-" + v["name"])).start())

        def per_vm():
            seen = {}
            for l in consumer.lines():
                seen.setdefault(l["vm"]["uuid"], set()).add(l["doc"]["seq"])
            return all(len(seen.get(v["uuid"], ())) >= 3 for v in vms) and seen
        seen = wait_for(per_vm, 60, "three samples from every VM at the consumer")
        lines = consumer.lines()
        for l in lines:
            v = [v for v in vms if v["uuid"] == l["vm"]["uuid"]][0]
            assert l["vm"]["name"] == v["name"]
            assert l["vm"]["proxy_host"] == "hv-test"
            assert l["routing_key"] == v["uuid"] + ".metrics.t"
        for uuid, seqs in seen.items():
            assert seqs == set(range(1, max(seqs) + 1)), (uuid, sorted(seqs))
        # Reals keep the agent's two decimals through the consumer's store.
        reals = []
        for f in glob.glob(str(consumer.dir / "metrics-*.jsonl")):
            with open(f) as fh:
                for line in fh:
                    json.loads(line, parse_float=lambda t: reals.append(t) or float(t))
        long = [t for t in reals if not re.fullmatch(r"-?\d+(\.\d{1,2})?", t)]
        assert reals and not long, long[:5]
        text = consumer.metrics()
        assert all('vm_name="%s"' % v["name"] in text for v in vms)
    finally:
        # Each exits 0 on SIGTERM, the sanitizers silent (leaks included).
        stop_all(*[a.stop for a in agents], consumer.stop, proxy.stop)
