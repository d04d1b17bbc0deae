"""Benchmark: IOP -> validated FHIR, beside its floor, and streaming memory.

Prints figures; asserts nothing (timings do not belong in tests).

* Throughput: records/s and resources/s for the full conversion of a generated cohort
  (contract validation + mapping + FHIR R4 validation of every emitted resource), beside the
  floor measured in the same run on the same output: FHIR validation alone. Target ratio
  conversion / floor <= 1.3.
* Memory: peak RSS of a streaming conversion (generate -> convert -> serialise -> discard) of
  10,000 records against 1,000, each in a fresh process. Target growth < 50 MB.

Usage: python bench/convert.py [--records 200] [--repeat 3] [--small 1000] [--large 10000]
       python bench/convert.py --skip-memory
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time

from iop_fhir.formats import fhir_json, fhir_validate
from iop_fhir.generate import generate_cohort
from iop_fhir.mappers.bundle import record_to_bundle
from iop_fhir.record import validate_record


def best_of(repeat: int, fn) -> float:
    """Fastest of ``repeat`` runs (the least disturbed by the rest of the machine)."""
    times = []
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def throughput(records: int, repeat: int, seed: int) -> None:
    cohort = list(generate_cohort(records, seed))
    bundles = [record_to_bundle(validate_record(r)) for r in cohort]
    resources = sum(len(b["entry"]) for b in bundles)

    def convert() -> None:
        for data in cohort:
            bundle = record_to_bundle(validate_record(data))
            issues = fhir_validate.validate_bundle_entries(bundle)
            assert not issues, issues[:3]

    def floor() -> None:
        for bundle in bundles:
            fhir_validate.validate_bundle_entries(bundle)

    def map_only() -> None:
        for data in cohort:
            record_to_bundle(validate_record(data))

    def serialise() -> None:
        for bundle in bundles:
            fhir_json.dumps(bundle)

    t_floor = best_of(repeat, floor)
    t_convert = best_of(repeat, convert)
    t_map = best_of(repeat, map_only)
    t_dump = best_of(repeat, serialise)
    print(f"cohort: {records} records, {resources} resources ({resources / records:.0f} per record), seed {seed}")
    print(f"floor   FHIR validation alone      {records / t_floor:8.1f} records/s {resources / t_floor:9.0f} resources/s")
    print(f"convert contract+map+validation    {records / t_convert:8.1f} records/s {resources / t_convert:9.0f} resources/s")
    print(f"  of which contract+map            {records / t_map:8.1f} records/s ({t_map / t_convert:.0%} of convert)")
    print(f"  serialisation (orjson), extra    {records / t_dump:8.1f} records/s")
    print(f"ratio convert / floor: {t_convert / t_floor:.2f}  (target <= 1.30)")


def stream_rss(count: int, seed: int) -> None:
    """Child mode: stream ``count`` records through the conversion, print peak RSS in KiB."""
    with open(os.devnull, "wb") as sink:
        for data in generate_cohort(count, seed):
            bundle = record_to_bundle(validate_record(data))
            issues = fhir_validate.validate_bundle_entries(bundle)
            if issues:
                raise SystemExit(f"invalid output: {issues[:3]}")
            sink.write(fhir_json.dumps(bundle) + b"\n")
    print(json.dumps({"records": count, "max_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))


def memory(small: int, large: int, seed: int) -> None:
    results = {}
    for count in (small, large):
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, __file__, "--child-stream", str(count), "--seed", str(seed)],
            check=True, capture_output=True, text=True,
        )
        results[count] = json.loads(out.stdout.strip().splitlines()[-1])["max_rss_kib"] / 1024
        print(f"stream {count:6d} records: peak RSS {results[count]:7.1f} MB ({time.perf_counter() - start:.0f} s)")
    growth = results[large] - results[small]
    print(f"growth {large} vs {small}: {growth:+.1f} MB  (target < 50 MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=10000)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--child-stream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_stream:
        stream_rss(args.child_stream, args.seed)
        return
    throughput(args.records, args.repeat, args.seed)
    if not args.skip_memory:
        memory(args.small, args.large, args.seed)


if __name__ == "__main__":
    main()
