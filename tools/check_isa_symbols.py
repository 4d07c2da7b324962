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


def isa_own_functions(isa_objs: list[Path], generic_objs: list[Path]) -> set[str]:
    """Mangled names of functions that only ISA objects define (local ones included)."""
    def funcs(obj: Path) -> set[str]:
        names = set()
        for line in run(["readelf", "-sW", str(obj)]).splitlines():
            f = line.split()
            if len(f) >= 8 and f[0].endswith(":") and f[3] == "FUNC" and f[6] != "UND":
                names.add(f[7])
        return names
    own = set().union(*(funcs(o) for o in isa_objs))
    generic = set().union(*(funcs(g) for g in generic_objs)) if generic_objs else set()
    return own - generic  # a name both define is ambiguous in the binary: treat it as generic


def check_vex(binary: Path, allowed: set[str], allow_re: list[re.Pattern]) -> list[str]:
    out = run(["objdump", "-d", "--no-show-raw-insn", "-M", "att", str(binary)])
    offenders: dict[str, str] = {}
    func = None
    for line in out.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if m:
            func = m.group(1)
            continue
        if func is None or func in allowed or func in offenders:
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
        base = re.sub(r"@.*$|\+0x[0-9a-f]+$", "", f)
        if base in allowed or any(r.search(d) for r in allow_re):
            continue
        bad.append(f"{binary.name}: {d}: {offenders[f]}")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build-dir", type=Path, required=True, help="CMake build dir with compile_commands.json")
    ap.add_argument("--binary", type=Path, action="append", default=[],
                    help="linked library / executable to disassemble (x86 only; repeatable)")
    ap.add_argument("--allow-vex", action="append", default=[], metavar="REGEX",
                    help="demangled function names allowed VEX code outside ISA objects (repeatable)")
    args = ap.parse_args(argv)
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
        allowed = isa_own_functions(isa_objs, generic_objs)
        allow_re = [re.compile(r) for r in args.allow_vex]
        for binary in args.binary:
            if not binary.is_file():
                raise UsageError(f"{binary} missing")
            bad = check_vex(binary, allowed, allow_re)
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
