"""moe/hostmem.py: the entry points re-execute once with glibc's huge-page tunable, keeping argv and env."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from moe import hostmem

SCRIPT = textwrap.dedent("""
    import os, sys
    print("start", flush=True)  # printed once per execution: twice if the process re-executed itself
    from moe.hostmem import use_huge_pages
    use_huge_pages()
    print("argv", sys.argv[1:], "tunables", os.environ.get("GLIBC_TUNABLES"), "keep", os.environ.get("KEEP_ME"))
""")


def run(tmp_path, **env) -> list[str]:
    path = tmp_path / "entry.py"
    path.write_text(SCRIPT)
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "MOE_HUGE_PAGES")}
    out = subprocess.run([sys.executable, str(path), "a b", "--x=1"], env=dict(base, KEEP_ME="yes", **env),
                         capture_output=True, text=True, check=True, cwd=os.getcwd()).stdout
    return out.splitlines()


@pytest.mark.skipif(not hostmem._applicable() and "glibc.malloc.hugetlb" not in os.environ.get("GLIBC_TUNABLES", ""),
                    reason="needs Linux, glibc >= 2.35 and transparent huge pages not disabled")
def test_reexecutes_once_with_the_tunable_and_same_argv(tmp_path):
    lines = run(tmp_path)
    assert lines == ["start", "start", "argv ['a b', '--x=1'] tunables glibc.malloc.hugetlb=1 keep yes"]
    lines = run(tmp_path, GLIBC_TUNABLES="glibc.malloc.arena_max=2")  # the user's tunables are kept
    assert lines[-1] == "argv ['a b', '--x=1'] tunables glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1 keep yes"


def test_opt_out_and_user_choice_are_respected(tmp_path):
    assert run(tmp_path, MOE_HUGE_PAGES="0") == ["start", "argv ['a b', '--x=1'] tunables None keep yes"]
    lines = run(tmp_path, GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
    assert lines == ["start", "argv ['a b', '--x=1'] tunables glibc.malloc.hugetlb=0 keep yes"]


@pytest.mark.parametrize("libc", [("glibc", "2.31"), ("", ""), ("musl", "1.2")])
def test_not_applicable_without_a_recent_glibc(monkeypatch, libc):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("MOE_HUGE_PAGES", raising=False)
    monkeypatch.setattr(hostmem.platform, "libc_ver", lambda: libc)
    assert not hostmem._applicable()
