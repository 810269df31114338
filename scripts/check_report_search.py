#!/usr/bin/env python3
"""Checks the search box of a wake2vec report.html in headless Chromium.

Usage: check_report_search.py REPORT.html SEARCH.json [WORD ...]

Starts chromedriver on a free port, opens the report through file://, types each WORD (default:
the first Wake word and the first base token of search.json, plus one Wake word from the
middle) into the search box, reads the neighbour list the page shows and checks it against
search.json's list for that word: the same words, groups and cosines (3 decimals), in order.
Python standard library only; talks the W3C WebDriver HTTP protocol to chromedriver.

Environment: CHROMEDRIVER (default /usr/bin/chromedriver or `chromedriver` on PATH), CHROME
(the browser binary, default: chromium or chromium-browser or google-chrome on PATH).
Exit status 0 when every word matches, 1 on a mismatch, 2 on a usage or setup error.
"""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request


def fail(msg, code=1):
    print(f"check_report_search: {msg}", file=sys.stderr)
    sys.exit(code)


def find_binary(env, names):
    if os.environ.get(env):
        return os.environ[env]
    for n in names:
        p = shutil.which(n) or (n if os.path.isabs(n) and os.access(n, os.X_OK) else None)
        if p:
            return p
    return None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Driver:
    def __init__(self, port):
        self.base = f"http://127.0.0.1:{port}"
        self.session = None

    def call(self, method, path, body=None, timeout=60):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read() or b"{}").get("value")
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:500]
            raise RuntimeError(f"{method} {path}: HTTP {e.code}: {detail}") from None

    def s(self, method, path, body=None, timeout=60):
        return self.call(method, f"/session/{self.session}{path}", body, timeout)


def element_id(v):
    # the W3C web element identifier (or the legacy JSON wire protocol's key)
    return v.get("element-6066-11e4-a52e-4f735466cecf") or v.get("ELEMENT")


def expected_list(index, q):
    n_base = index["n_base"]
    return [
        (" ".join(index["words"][w].split()), "base" if w < n_base else "wake", f"{c / 1000:.3f}")
        for w, c in zip(index["neighbours"][q], index["cos_milli"][q])
    ]


def main():
    if len(sys.argv) < 3:
        fail(__doc__.strip().splitlines()[2], 2)
    report = pathlib.Path(sys.argv[1]).resolve()
    search = pathlib.Path(sys.argv[2])
    if not report.is_file():
        fail(f"{report} is not a file: run `wake2vec report` first", 2)
    try:
        index = json.loads(search.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        fail(f"cannot read {search}: {e}", 2)
    words = [index["words"][q] for q in index["queries"]]
    first_of = {}
    for i, w in enumerate(words):
        first_of.setdefault(w, i)
    if len(sys.argv) > 3:
        wanted = sys.argv[3:]
    else:
        wake = [i for i, q in enumerate(index["queries"]) if q >= index["n_base"]]
        base = [i for i, q in enumerate(index["queries"]) if q < index["n_base"]]
        picks = [wake[0], wake[len(wake) // 2]] if wake else []
        # a base token without surrounding spaces, so that typing it is unambiguous
        picks += [i for i in base if words[i] == words[i].strip() and words[i]][:1]
        wanted = [words[i] for i in picks]
    driver_bin = find_binary("CHROMEDRIVER", ["/usr/bin/chromedriver", "chromedriver"])
    chrome_bin = find_binary("CHROME", ["chromium", "chromium-browser", "google-chrome"])
    if not driver_bin:
        fail("no chromedriver (install chromium-driver, or set CHROMEDRIVER)", 2)
    port = free_port()
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [driver_bin, f"--port={port}"], stdout=log, stderr=subprocess.STDOUT
    )
    d = Driver(port)
    profile = tempfile.mkdtemp(prefix="w2v-chrome-")
    try:
        for _ in range(200):
            try:
                if d.call("GET", "/status", timeout=2).get("ready"):
                    break
            except (OSError, RuntimeError):
                pass
            time.sleep(0.05)
        else:
            log.seek(0)
            fail(f"chromedriver did not start: {log.read().decode(errors='replace')[:500]}", 2)
        opts = {
            "args": [
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                f"--user-data-dir={profile}",
            ]
        }
        if chrome_bin:
            opts["binary"] = chrome_bin
        caps = {"capabilities": {"alwaysMatch": {"goog:chromeOptions": opts}}}
        r = d.call("POST", "/session", caps, timeout=120)
        d.session = r["sessionId"]
        d.s("POST", "/url", {"url": report.as_uri()}, timeout=120)
        box = element_id(d.s("POST", "/element", {"using": "css selector", "value": "#w2v-q"}))
        bad = 0
        for word in wanted:
            if word not in first_of:
                fail(f"{word!r} is not among the queries of {search}", 2)
            q = first_of[word]
            d.s("POST", f"/element/{box}/clear", {})
            d.s("POST", f"/element/{box}/value", {"text": word})
            rows = d.s(
                "POST",
                "/elements",
                {"using": "css selector", "value": "#w2v-results tbody tr"},
            )
            shown = []
            for row in rows:
                cells = d.s(
                    "POST",
                    f"/element/{element_id(row)}/elements",
                    {"using": "css selector", "value": "td"},
                )
                text = [
                    " ".join(d.s("GET", f"/element/{element_id(c)}/text").split())
                    for c in cells
                ]
                shown.append(tuple(text[1:4]))
            want = expected_list(index, q)
            status = d.s(
                "GET",
                "/element/"
                + element_id(
                    d.s("POST", "/element", {"using": "css selector", "value": "#w2v-status"})
                )
                + "/text",
            )
            if shown == want:
                print(f"ok {word!r}: {len(shown)} neighbours match search.json ({status})")
                for w, g, c in shown[:3]:
                    print(f"    {w!r} {g} {c}")
            else:
                bad += 1
                print(f"MISMATCH {word!r}:\n  page   {shown}\n  search {want}")
        if bad:
            fail(f"{bad} of {len(wanted)} words differ")
        print(f"all {len(wanted)} words match")
    finally:
        if d.session:
            try:
                d.s("DELETE", "", timeout=30)
            except (OSError, RuntimeError):
                pass
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
