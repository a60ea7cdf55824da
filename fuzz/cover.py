#!/usr/bin/env python3
"""Picks a small set of fuzz inputs that covers the edges a larger set covers (fuzz/run.sh
--merge): each input's own edges from a libFuzzer merge of it alone, then a greedy set cover
(the input adding the most uncovered edges first), stopped at MAX_INPUTS so that the corpus
`cargo test` replays stays small (the last picks each add an edge or two).

usage: cover.py HARNESS INPUT_DIR OUTPUT_DIR
"""
import os
import shutil
import subprocess
import sys
import tempfile

MAX_INPUTS = 300


def edges_of(harness, path, scratch):
    """The coverage edges the harness reaches on the input at `path`."""
    one = os.path.join(scratch, "one")
    empty = os.path.join(scratch, "empty")
    control = os.path.join(scratch, "control")
    for d in (one, empty):
        shutil.rmtree(d, ignore_errors=True)
        os.mkdir(d)
    if os.path.exists(control):
        os.remove(control)  # libFuzzer resumes from an existing control file
    shutil.copy(path, one)
    subprocess.run(
        [harness, "-merge=1", "-use_counters=0", "-merge_control_file=" + control, empty, one],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
    )
    covered = set()
    with open(control) as f:
        for line in f:
            words = line.split()
            if words and words[0] == "COV":
                covered.update(words[2:])
    return covered


def main():
    harness, inputs, output = sys.argv[1:4]
    with tempfile.TemporaryDirectory() as scratch:
        edges = {
            name: edges_of(harness, os.path.join(inputs, name), scratch)
            for name in sorted(os.listdir(inputs))
        }
    uncovered = set().union(*edges.values()) if edges else set()
    while uncovered and MAX_INPUTS > len(os.listdir(output)):
        best = max(edges, key=lambda n: len(edges[n] & uncovered))
        uncovered -= edges.pop(best)
        shutil.copy(os.path.join(inputs, best), output)
    print(f"cover.py: {len(uncovered)} edges left to inputs past the first {MAX_INPUTS}")


if __name__ == "__main__":
    main()
