"""Summarise py-spy raw (collapsed-stack) profiles: `python bench/profile_summary.py FILE [--top N]
[--focus SUBSTRING]`. Prints the share of samples whose stack contains each function
(inclusive) and the share where it is the leaf (self), the top N of each."""
from __future__ import annotations

import argparse
import re
from collections import Counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("file")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--focus", help="only stacks containing this substring")
    args = parser.parse_args()
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    total = 0
    with open(args.file) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not count.isdigit() or (args.focus and args.focus not in stack):
                continue
            n = int(count)
            frames = [re.sub(r":\d+\)$", ")", fr) for fr in stack.split(";")]
            total += n
            for frame in set(frames):
                inclusive[frame] += n
            leaf[frames[-1]] += n
    print(f"{total} samples")
    print("-- inclusive --")
    for frame, n in inclusive.most_common(args.top):
        print(f"{100 * n / total:6.1f}%  {frame}")
    print("-- self --")
    for frame, n in leaf.most_common(args.top):
        print(f"{100 * n / total:6.1f}%  {frame}")


if __name__ == "__main__":
    main()
