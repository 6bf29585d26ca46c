#!/usr/bin/env python3
"""Plants the hand mutations of scripts/mutants/*.txt one at a time and runs a test suite
against each: killed (a test failed), survived (every test passed), unviable (it does not
build). The source is restored after each, whatever happens. See scripts/mutants.sh."""

import argparse
import os
import pathlib
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

# The generated properties alone: no hand-written machine test (the core's random drives of
# one machine against a plausible or impatient agent, and the simulator's scenarios).
PROPS = [
    ["cargo", "test", "-q", "-p", "consul-lock-core", "--test", "lock_machine_props"],
    ["cargo", "test", "-q", "-p", "consul-lock-testkit", "--test", "sim_properties", "--",
     "--exact", "safety_fencing_liveness_and_cleanup",
     "queued_and_unqueued_contenders_keep_safety_order_and_liveness"],
    ["cargo", "test", "-q", "-p", "consul-lock-testkit", "--test", "sim_semaphore_properties", "--",
     "--exact", "at_most_limit_holders_fencing_liveness_and_cleanup"],
    ["cargo", "test", "-q", "-p", "consul-lock-testkit", "--test", "sim_key_set_properties", "--",
     "--exact", "key_set_safety_outcomes_prompt_loss_and_cleanup"],
    # A million simulated seconds of ten-minute scenarios (about a minute): what only long runs
    # with many faults reach. Last, so that it runs only for what the quick ones let through.
    ["cargo", "test", "-q", "-p", "consul-lock-testkit", "--test", "sim_scale"],
]
# Every test of the core and of the simulated Consul (minutes, not an hour; `sim_differential`
# starts a real agent, as the test kit finds one).
ALL = [
    ["cargo", "test", "-q", "-p", "consul-lock-core"],
    ["cargo", "test", "-q", "-p", "consul-lock-testkit", "--test", "sim_properties",
     "--test", "sim_semaphore_properties", "--test", "sim_queue", "--test", "sim_key_set_properties",
     "--test", "sim_consul", "--test", "sim_differential", "--test", "sim_scale"],
]
BUILD = ["cargo", "test", "-q", "--no-run", "-p", "consul-lock-core", "-p", "consul-lock-testkit"]


class Mutation:
    def __init__(self, name, file, why, survives, old, new):
        self.name, self.file, self.why, self.survives, self.old, self.new = name, file, why, survives, old, new


def parse(path):
    text = path.read_text()
    mutations = []
    pattern = re.compile(r"^## (\S+)\n(.*?)^<<<\n(.*?)^===\n(.*?)^>>>\n", re.M | re.S)
    for m in pattern.finditer(text):
        fields = dict(re.findall(r"^(\w+): (.*)$", m.group(2), re.M))
        if "file" not in fields or "why" not in fields:
            sys.exit(f"{path}: mutation {m.group(1)} needs file: and why:")
        mutations.append(Mutation(m.group(1), fields["file"], fields["why"], fields.get("survives"),
                                  m.group(3), m.group(4)))
    if text.count("\n## ") + text.startswith("## ") != len(mutations):
        sys.exit(f"{path}: a mutation block is malformed")
    return mutations


def run(commands, timeout, log, cases, seed):
    # A fixed seed: the same scenarios for every mutation and every run, so verdicts repeat.
    env = dict(os.environ, PROPTEST_MAX_SHRINK_ITERS="0", PROPTEST_CASES=str(cases), PROPTEST_RNG_SEED=str(seed))
    for command in commands:
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return "killed (timeout)"
        if done.returncode != 0:
            return "killed"
    return "survived"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--suite", choices=["props", "all"], default="all")
    parser.add_argument("--only", action="append", help="run only these mutations (by name)")
    parser.add_argument("--list", action="store_true", help="check and list the mutations")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per test command")
    parser.add_argument("--cases", type=int, default=300, help="cases per generated property")
    parser.add_argument("--seed", type=int, default=1, help="the generated properties' seed")
    parser.add_argument("--log", default=str(ROOT / "target" / "mutants.log"))
    args = parser.parse_args()

    mutations = [m for f in sorted((ROOT / "scripts" / "mutants").glob("*.txt")) for m in parse(f)]
    stale = []
    for m in mutations:
        count = (ROOT / m.file).read_text().count(m.old)
        if count != 1:
            stale.append(f"{m.name}: its text is in {m.file} {count} times (must be once)")
    if stale:
        sys.exit("stale mutations (keep scripts/mutants in step with the code):\n  " + "\n  ".join(stale))
    if args.only:
        unknown = set(args.only) - {m.name for m in mutations}
        if unknown:
            sys.exit(f"no such mutation: {', '.join(sorted(unknown))}")
        mutations = [m for m in mutations if m.name in args.only]
    if args.list:
        for m in mutations:
            print(f"{m.name:32} {m.file}: {m.why}")
        return 0

    suite = PROPS if args.suite == "props" else ALL
    # Proptest records failures next to the tests; planted bugs must not leave any behind.
    regressions = {p: p.read_bytes() for p in ROOT.glob("**/tests/*.proptest-regressions")
                   if "target" not in p.parts}
    pathlib.Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    results = []
    with open(args.log, "w") as log:
        for m in mutations:
            path = ROOT / m.file
            original = path.read_text()
            started = time.time()
            try:
                path.write_text(original.replace(m.old, m.new, 1))
                log.write(f"\n===== {m.name}\n")
                log.flush()
                built = subprocess.run(BUILD, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
                verdict = "unviable" if built.returncode != 0 else run(suite, args.timeout, log, args.cases, args.seed)
            finally:
                path.write_text(original)
                for p, content in regressions.items():
                    p.write_bytes(content)
                for p in ROOT.glob("**/tests/*.proptest-regressions"):
                    if "target" not in p.parts and p not in regressions:
                        p.unlink()
            seconds = time.time() - started
            results.append((m, verdict))
            print(f"{verdict:18} {m.name:32} {seconds:6.0f} s", flush=True)

    viable = [r for r in results if r[1] != "unviable"]
    killed = [r for r in viable if r[1].startswith("killed")]
    print(f"\nsuite {args.suite}: {len(killed)} of {len(viable)} viable mutations killed"
          + (f" ({100 * len(killed) // len(viable)}%)" if viable else ""))
    for m, verdict in results:
        if verdict == "survived":
            print(f"  survived: {m.name}: {m.why}" + (f"\n    (known: {m.survives})" if m.survives else ""))
        if verdict == "unviable":
            print(f"  unviable: {m.name} (does not build: fix its text)")
    return 1 if any(v == "unviable" for _, v in results) else 0


if __name__ == "__main__":
    sys.exit(main())
