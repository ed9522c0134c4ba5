"""engine/cpu.py: the CPU's vendor, name and flags from /proc/cpuinfo's first processor block."""
from __future__ import annotations

from engine import cpu

INTEL = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu avx2 avx512f amx_int8

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: not read
flags\t\t: fpu
"""
ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd sve
CPU implementer\t: 0x41
"""


_read = cpu.first_processor.__wrapped__  # uncached: each test reads its own file


def test_the_first_processor_block_is_read_and_the_rest_is_not(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(INTEL)
    info = cpu.first_processor(str(path))
    assert info["vendor_id"] == "GenuineIntel" and info["model name"] == "Intel(R) Xeon(R) Processor"
    assert info["flags"].split() == ["fpu", "avx2", "avx512f", "amx_int8"]


def test_arm_features_count_as_flags_and_a_missing_file_gives_unknown(tmp_path, monkeypatch):
    path = tmp_path / "cpuinfo"
    path.write_text(ARM)
    monkeypatch.setattr(cpu, "first_processor", lambda: _read(str(path)))
    assert cpu.flags() == {"fp", "asimd", "sve"} and cpu.vendor() == "unknown" and cpu.model_name() == ""
    monkeypatch.setattr(cpu, "first_processor", lambda: _read(str(tmp_path / "absent")))
    assert cpu.vendor() == "unknown" and cpu.flags() == set()


def test_this_machines_flags_match_the_file():
    with open("/proc/cpuinfo") as f:
        first = next((line for line in f if line.split(":")[0].strip() in ("flags", "Features")), "")
    assert cpu.flags() == set(first.partition(":")[2].split())
