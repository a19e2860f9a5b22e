"""Which stream operations wait behind a waiting entry of another stream.

The GPU's hardware queues (CUDA_DEVICE_MAX_CONNECTIONS, read when CUDA
starts) and its copy engines decide whether work on one stream can be held
back by work waiting on another: a staged proxy's downloads, landings and
raises must never queue behind the kernels that spin for them, nor behind
anything waiting for those kernels (docs/ARCHITECTURE.md). Stream 0 gets a
sleeping kernel and then an entry that waits for it: a kernel, a
device-to-host copy or a host-to-device copy. Each other stream then gets
one operation and an event, and the operation is "held back" when its
event has not completed 15 ms later, while stream 0 still sleeps. Run once
per value:

    for c in 1 2 4 8 32; do CUDA_DEVICE_MAX_CONNECTIONS=$c python3 scripts/queues.py; done

(2026-12-06, H100, behind a waiting kernel: with 1 kernels and
device-to-device copies were held back on every stream, copies to and from
the host on none; with 2 and more nothing was. Behind a waiting copy it has
not run yet: a staged proxy's count download once never finished while the
layer's status copy waited behind its call, at 32.) A diagnostic: uses
torch only to reach the driver.
"""

import os
import time

import torch

SLEEP_CYCLES = int(1e8)  # about 50 ms at an H100's clock


def main() -> None:
    queues = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "unset (8)")
    torch.cuda.init()
    dev = torch.device("cuda")
    # torch deals pool streams round robin: 32 created together.
    streams = [torch.cuda.Stream() for _ in range(32)]
    small = torch.zeros(1, device=dev)
    n = 1 << 20
    pinned = torch.ones(n).pin_memory()
    back = torch.empty(n).pin_memory()
    a = torch.empty(n, device=dev)
    b = torch.ones(n, device=dev)

    ops = {
        "kernel": lambda: small.add_(1),
        "host-to-device copy": lambda: a.copy_(pinned, non_blocking=True),
        "device-to-host copy": lambda: back.copy_(b, non_blocking=True),
        "device-to-device copy": lambda: a.copy_(b, non_blocking=True),
    }

    small_back = torch.empty(1).pin_memory()
    small_up = torch.ones(1).pin_memory()
    # What waits on stream 0 behind the sleep: a kernel, or a copy either
    # way (as a layer's status copy once waited behind its call, or a
    # caller's copies may wait behind a staged call).
    waiting = {
        "kernel": lambda: small.add_(1),
        "device-to-host copy": lambda: small_back.copy_(small, non_blocking=True),
        "host-to-device copy": lambda: small.copy_(small_up, non_blocking=True),
    }

    def held_back(stream: int, op, wait) -> bool:
        with torch.cuda.stream(streams[0]):
            torch.cuda._sleep(SLEEP_CYCLES)
            wait()  # waits for the sleep: a waiting entry
        done = torch.cuda.Event()
        with torch.cuda.stream(streams[stream]):
            op()
            done.record()
        time.sleep(0.015)
        held = not done.query()
        torch.cuda.synchronize()
        return held

    # Every kernel loaded and every op run once before any is measured:
    # under lazy loading a first launch may wait for the sleeping kernel.
    for s in streams:
        with torch.cuda.stream(s):
            torch.cuda._sleep(1000)
            for op in [*ops.values(), *waiting.values()]:
                op()
    torch.cuda.synchronize()

    for behind, wait in waiting.items():
        for name, op in ops.items():
            held = [s for s in range(1, len(streams)) if held_back(s, op, wait)]
            print(
                f"CUDA_DEVICE_MAX_CONNECTIONS={queues} {name} behind a waiting {behind}: "
                f"held back on streams {held or 'none'}"
            )


if __name__ == "__main__":
    main()
