#!/usr/bin/env python3
"""Static checks that ISA-flagged code cannot leak into code that runs before dispatch.

Only a few source files are compiled with SIMD flags (-mavx2, -mavx512*, -march=...+dotprod);
dispatch (csrc/cpu/) runs them only on a CPU that has the extension. Two ways that guarantee
breaks without any source line looking wrong, both of which this script detects:

  symbols  An inline function or template instantiation (std::vector<T>::resize, std::min,
           a header helper) that an ISA-flagged file uses is emitted there as a weak / COMDAT
           definition. If generic code uses the same symbol, the linker keeps ONE copy -- maybe
           the ISA-flagged one -- and generic code calls it on every CPU: SIGILL on a CPU
           without the extension. Check: every weak, unique or COMDAT-group symbol DEFINED in an
           ISA object that any generic object also defines or references fails, by name.

  vex      The linked artifact itself (x86 only): every function whose name is not one of the
           ISA objects' own symbols must be baseline x86-64 (SSE2) code, so it must not contain
           a VEX/EVEX-encoded instruction (a ymm/zmm/k-mask operand or a `v`-prefixed mnemonic).
           --allow-vex REGEX exempts functions deliberately compiled with a target attribute
           (matched against the demangled name).

The objects and their flags come from the build's compile_commands.json (configure with
-DCMAKE_EXPORT_COMPILE_COMMANDS=ON): an object is ISA-flagged when its command line carries
-mavx*, -mfma, -msse3 and up, -mf16c, -mbmi*, or -march=/-mcpu= (except x86-64 itself).

  tools/check_isa_symbols.py --build-dir build-x86compat [--binary build-x86compat/_core*.so ...]
  tools/check_isa_symbols.py --self-test   # shows both checks fail on a known-bad pair of files

The binaries must keep their local symbols (pybind11 strips them from a Release module: build
with -DCMAKE_STRIP=true), or objdump attributes file-local ISA functions to a neighbour.

Exit status 0 when every check passes, 1 when one fails (each offender printed), 2 on a usage
error (no compile database, a missing tool or object).
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

ISA_FLAG = re.compile(r"^-m(avx|fma|sse3|ssse3|sse4|f16c|bmi|lzcnt|popcnt|amx)|^-m(arch|cpu)=(?!x86-64$)")
# A VEX/EVEX instruction: v-prefixed mnemonic (vmovdqu, vpaddd, vzeroupper, ...), or an operand
# that only VEX/EVEX can name (ymm, zmm, opmask k0-k7 as in {k1} or kmovw).
VEX_MNEMONIC = re.compile(r"^(\{[a-z0-9]+\}\s+)?v[a-z0-9]+\b")
VEX_OPERAND = re.compile(r"%[yz]mm\d+|%k[0-7]\b|\{%k[0-7]\}")


class UsageError(Exception):
    pass


def run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    except FileNotFoundError as e:
        raise UsageError(f"{cmd[0]} not found (binutils needed)") from e
    except subprocess.CalledProcessError as e:
        raise UsageError(f"{' '.join(cmd)} failed: {e.stderr.strip()}") from e


def demangle(names: list[str]) -> dict[str, str]:
    if not names:
        return {}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout
    return dict(zip(names, out.splitlines()))


def objects_from_compile_db(build_dir: Path) -> tuple[list[Path], list[Path]]:
    """(ISA-flagged objects, generic objects) of every C++ compile in the build."""
    db = build_dir / "compile_commands.json"
    if not db.is_file():
        raise UsageError(f"{db} missing: configure with -DCMAKE_EXPORT_COMPILE_COMMANDS=ON")
    isa, generic = [], []
    for entry in json.loads(db.read_text()):
        args = entry.get("arguments") or shlex.split(entry["command"])
        obj = None
        for i, a in enumerate(args):
            if a == "-o" and i + 1 < len(args):
                obj = args[i + 1]
        if obj is None:
            continue
        path = Path(entry.get("directory", build_dir)) / obj
        if not path.is_file():
            raise UsageError(f"{path} missing: build first")
        (isa if any(ISA_FLAG.match(a) for a in args) else generic).append(path)
    if not isa:
        raise UsageError(f"no ISA-flagged object in {db} (is this an x86_64 or aarch64 build?)")
    return isa, generic


def comdat_sections(obj: Path) -> set[int]:
    """Indices of the sections that belong to a COMDAT group."""
    out = run(["readelf", "-gW", str(obj)])
    return {int(m) for m in re.findall(r"^\s+\[\s*(\d+)\]\s+\S", out, re.M)}


def symbols(obj: Path) -> tuple[dict[str, str], set[str], set[str]]:
    """(shared definitions: name -> binding, all defined names, undefined names) of an object.

    A shared definition is a function the linker may merge with another object's: WEAK, GNU
    UNIQUE, or any global in a COMDAT-group section."""
    groups = comdat_sections(obj)
    shared, defined, undefined = {}, set(), set()
    for line in run(["readelf", "-sW", str(obj)]).splitlines():
        f = line.split()
        # Num: Value Size Type Bind Vis Ndx Name
        if len(f) < 8 or not f[0].endswith(":") or f[3] in ("SECTION", "FILE"):
            continue
        kind, bind, ndx, name = f[3], f[4], f[6], f[7]
        if bind == "LOCAL":
            continue
        if ndx == "UND":
            undefined.add(name)
            continue
        defined.add(name)
        # Code only: weak data (DW.ref.__gxx_personality_v0, guard variables) holds no
        # instructions, whichever copy the linker keeps.
        if kind not in ("FUNC", "IFUNC"):
            continue
        if bind in ("WEAK", "UNIQUE") or (ndx.isdigit() and int(ndx) in groups):
            shared[name] = bind
    return shared, defined, undefined


def check_symbols(isa_objs: list[Path], generic_objs: list[Path]) -> list[str]:
    used_by_generic: dict[str, list[str]] = {}
    for g in generic_objs:
        _, defined, undefined = symbols(g)
        for name in defined | undefined:
            used_by_generic.setdefault(name, []).append(g.name)
    bad = []
    for o in isa_objs:
        shared, _, _ = symbols(o)
        hits = sorted(n for n in shared if n in used_by_generic)
        names = demangle(hits)
        for n in hits:
            users = ", ".join(sorted(set(used_by_generic[n]))[:3])
            bad.append(f"{o.name}: {shared[n].lower()} {names.get(n, n)}  (also in {users})")
    return bad


def global_functions(obj: Path) -> set[str]:
    names = set()
    for line in run(["readelf", "-sW", str(obj)]).splitlines():
        f = line.split()
        if len(f) >= 8 and f[0].endswith(":") and f[3] == "FUNC" and f[4] != "LOCAL" and f[6] != "UND":
            names.add(f[7])
    return names


def isa_function_addresses(binary: Path, isa_objs: list[Path], generic_objs: list[Path]) -> set[int]:
    """Start addresses, in the linked binary, of the functions that come from ISA objects.

    File-local functions are attributed by the FILE symbol that precedes them in .symtab (the
    same local name may exist in a generic file too). Global ones count when only ISA objects
    define them: a weak function that generic objects define as well is exactly the case that
    must not be excused."""
    isa_files = {o.name[:-2] for o in isa_objs if o.name.endswith(".o")}
    isa_globals = set().union(*(global_functions(o) for o in isa_objs))
    generic_globals = set().union(*(global_functions(g) for g in generic_objs)) if generic_objs else set()
    own_globals = isa_globals - generic_globals
    addrs, current_file, in_symtab = set(), None, False
    for line in run(["readelf", "-sW", str(binary)]).splitlines():
        if line.startswith("Symbol table"):
            in_symtab = "'.symtab'" in line
            continue
        f = line.split()
        if not in_symtab or len(f) < 7 or not f[0].endswith(":"):
            continue
        if f[3] == "FILE":
            current_file = f[7] if len(f) >= 8 else None
            continue
        if f[3] != "FUNC" or f[6] == "UND" or len(f) < 8:
            continue
        name = f[7].split("@")[0]
        if (f[4] == "LOCAL" and current_file in isa_files) or (f[4] != "LOCAL" and name in own_globals):
            addrs.add(int(f[1], 16))
    return addrs


def check_vex(binary: Path, allowed: set[int], allow_re: list[re.Pattern]) -> list[str]:
    out = run(["objdump", "-d", "--no-show-raw-insn", "-M", "att", str(binary)])
    offenders: dict[str, str] = {}
    func = None
    for line in out.splitlines():
        m = re.match(r"^([0-9a-f]+) <(.+)>:$", line)
        if m:
            func = None if int(m.group(1), 16) in allowed else m.group(2)
            continue
        if func is None or func in offenders:
            continue
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        insn = parts[-1].strip()
        if VEX_MNEMONIC.match(insn) or VEX_OPERAND.search(insn):
            offenders[func] = insn
    names = demangle(sorted(offenders))
    bad = []
    for f in sorted(offenders):
        d = names.get(f, f)
        if any(r.search(d) for r in allow_re):
            continue
        bad.append(f"{binary.name}: {d}: {offenders[f]}")
    return bad


# The self-test's translation units: an inline function (a weak symbol) that an -mavx2 file and
# a generic file both instantiate. Linked with the ISA object first, the linker keeps its copy,
# so generic code calls AVX2 code on every CPU. The fixed variant gives each file its own copy.
SELF_TEST_HEADER = """
#pragma once
{linkage} void scale_all(float* x, int n) {{
  for (int i = 0; i < n; ++i) x[i] = x[i] * 3.0f + 1.0f;
}}
"""
SELF_TEST_ISA = """
#include "helper.h"
void scale_avx2(float* x, int n) { scale_all(x, n); }
"""
SELF_TEST_GENERIC = """
#include "helper.h"
void scale_generic(float* x, int n) { scale_all(x, n); }
"""


def self_test() -> int:
    """Both checks on a deliberately bad build (must fail, naming the helper) and on the fixed
    one (must pass). Returns 0 when the checker behaves, 1 otherwise."""
    import tempfile

    cxx = "c++"
    ok = True
    for variant, linkage in (("bad", '__attribute__((noinline)) inline'), ("fixed", '__attribute__((noinline)) static inline')):
        with tempfile.TemporaryDirectory(prefix="isa-selftest-") as tmp:
            d = Path(tmp)
            (d / "helper.h").write_text(SELF_TEST_HEADER.format(linkage=linkage))
            (d / "isa.cc").write_text(SELF_TEST_ISA)
            (d / "generic.cc").write_text(SELF_TEST_GENERIC)
            db = []
            for src, flags in (("isa.cc", ["-mavx2", "-mfma"]), ("generic.cc", [])):
                args = [cxx, "-O3", "-fPIC", *flags, "-c", src, "-o", src + ".o"]
                run_in(d, args)
                db.append({"directory": str(d), "arguments": args, "file": src})
            (d / "compile_commands.json").write_text(json.dumps(db))
            run_in(d, [cxx, "-shared", "-o", "libselftest.so", "isa.cc.o", "generic.cc.o"])
            isa_objs, generic_objs = objects_from_compile_db(d)
            sym_bad = check_symbols(isa_objs, generic_objs)
            lib = d / "libselftest.so"
            vex_bad = check_vex(lib, isa_function_addresses(lib, isa_objs, generic_objs), [])
            named = all(any("scale_all" in b for b in bad) for bad in (sym_bad, vex_bad))
            if variant == "bad":
                good = named
                print(f"self-test, shared inline helper: symbol check {'failed' if sym_bad else 'PASSED'}, "
                      f"VEX check {'failed' if vex_bad else 'PASSED'} (both must fail naming scale_all)")
            else:
                good = not sym_bad and not vex_bad
                print(f"self-test, file-local helper: symbol check {'FAILED' if sym_bad else 'passed'}, "
                      f"VEX check {'FAILED' if vex_bad else 'passed'} (both must pass)")
            for b in sym_bad + vex_bad:
                print(f"  {b}")
            ok = ok and good
    print(f"self-test: {'passed' if ok else 'FAILED'}")
    return 0 if ok else 1


def run_in(d: Path, args: list[str]) -> None:
    try:
        subprocess.run(args, cwd=d, check=True, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise UsageError(f"{args[0]} not found") from e
    except subprocess.CalledProcessError as e:
        raise UsageError(f"{' '.join(args)} failed: {e.stderr.strip()}") from e


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build-dir", type=Path, help="CMake build dir with compile_commands.json")
    ap.add_argument("--self-test", action="store_true", help="check the checker on a known-bad build")
    ap.add_argument("--binary", type=Path, action="append", default=[],
                    help="linked library / executable to disassemble (x86 only; repeatable)")
    ap.add_argument("--allow-vex", action="append", default=[], metavar="REGEX",
                    help="demangled function names allowed VEX code outside ISA objects (repeatable)")
    args = ap.parse_args(argv)
    if args.self_test:
        try:
            return self_test()
        except UsageError as e:
            print(f"check_isa_symbols: error: {e}", file=sys.stderr)
            return 2
    if args.build_dir is None:
        ap.error("--build-dir is required (or --self-test)")
    try:
        isa_objs, generic_objs = objects_from_compile_db(args.build_dir)
        print(f"ISA-flagged objects: {', '.join(sorted(o.name for o in isa_objs))}; "
              f"{len(generic_objs)} generic objects")
        failures = 0
        bad = check_symbols(isa_objs, generic_objs)
        for b in bad:
            print(f"  shared symbol: {b}")
        print(f"symbol check: {'FAILED' if bad else 'passed'} ({len(bad)} weak/COMDAT symbols of ISA "
              "objects also used by generic objects)")
        failures += bool(bad)
        allow_re = [re.compile(r) for r in args.allow_vex]
        for binary in args.binary:
            if not binary.is_file():
                raise UsageError(f"{binary} missing")
            bad = check_vex(binary, isa_function_addresses(binary, isa_objs, generic_objs), allow_re)
            for b in bad:
                print(f"  VEX in generic code: {b}")
            print(f"VEX check of {binary.name}: {'FAILED' if bad else 'passed'} "
                  f"({len(bad)} generic functions with VEX/EVEX instructions)")
            failures += bool(bad)
    except UsageError as e:
        print(f"check_isa_symbols: error: {e}", file=sys.stderr)
        return 2
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
