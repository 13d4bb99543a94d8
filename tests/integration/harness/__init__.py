"""Integration-test harness for vmproxy: a private RabbitMQ node
(harness.rabbitmq), programs under test (harness.procs, harness.vmproxyd)."""
from harness.procs import (Proc, free_port, run_proc, sanitizer_report, stop_all,
                           stop_clean, tail, wait_for)

__all__ = ["Proc", "free_port", "run_proc", "sanitizer_report", "stop_all",
           "stop_clean", "tail", "wait_for"]
