"""The data benchmarks' corpus and measuring harness (`matelike bench tokenize` and `bench pack` use them).

The benchmark corpus is generated here, no download: Chinese-like documents of words drawn from a Zipf
distribution over a synthetic lexicon built from common characters, with clause punctuation, some English
words and numbers. It has the statistics that matter for BPE speed (frequent short words, a long tail of
rare ones, clause-length pre-tokens) without shipping a large corpus. Each measured job runs in a fresh
child interpreter that reports its own wall and CPU time and peak resident memory (for pack, the main
process and its workers together), so the figures are the job's alone. The load average is printed alongside: on a busy
machine wall-clock MB/s drops, `mb_per_cpu_s` much less.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

# About 500 frequent Chinese characters; the lexicon draws from them with a Zipf skew, plus rare CJK.
COMMON_CHARS = (
    "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面"
    "而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性"
    "好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第"
    "向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管"
    "特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处"
    "队南给色光门即保治北造百规热领七海口东导器压志世金增争济阶油思术极交受联什认六共权收证改清己美再采转更单"
    "风切打白教速花带安场身车例真务具万每目至达走积示议声报斗完类八离华名确才科张信马节话米整空元况今集温传土"
    "许步群广石记需段研界拉林律叫且究观越织装影算低持音众书布复容儿须际商非验连断深难近矿千周委素技备半办青省"
    "列习响约支般史感劳便团往酸历市克何除消构府称太准精值号率族维划选标写存候毛亲快效斯院查江型眼王按格养易置"
    "派层片始却专状育厂京识适属圆包火住调满县局照参红细引听该铁价严"
)
ENGLISH = ("the", "model", "data", "GPU", "AI", "iPhone", "Python", "Beijing", "OK", "WiFi", "App", "CEO")
PUNCT = ("，", "，", "，", "、", "。", "。", "！", "？", "；", "：")


def synthetic_documents(seed: int = 0, lexicon_size: int = 30_000) -> Iterator[str]:
    """Endless Chinese-like documents (deterministic for a seed)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    chars = np.array(list(COMMON_CHARS))
    char_p = 1.0 / np.arange(1, len(chars) + 1) ** 0.9
    char_p /= char_p.sum()
    lengths = rng.choice([1, 2, 3, 4], size=lexicon_size, p=[0.3, 0.5, 0.12, 0.08])
    picks = rng.choice(len(chars), size=int(lengths.sum()), p=char_p)
    rare = rng.random(picks.size) < 0.01  # a rare character now and then: the long tail BPE leaves as bytes
    words: list[str] = []
    pos = 0
    for n in lengths:
        w = "".join(chr(int(rng.integers(0x4E00, 0x9FA5))) if rare[pos + k] else chars[picks[pos + k]]
                    for k in range(n))
        words.append(w)
        pos += n
    words += list(ENGLISH)
    word_p = 1.0 / np.arange(1, len(words) + 1) ** 1.05
    word_p /= word_p.sum()
    while True:
        # Draw in bulk (numpy), assemble in Python: fast enough to write 200 MB in well under a minute.
        draws = rng.choice(len(words), size=1_000_000, p=word_p).tolist()
        clause_lens = rng.integers(2, 12, size=150_000).tolist()
        puncts = rng.integers(0, len(PUNCT), size=150_000).tolist()
        numbers = rng.integers(0, 100_000, size=150_000).tolist()
        doc_lens = rng.integers(3, 60, size=5_000).tolist()
        w = c = 0
        for n_clauses in doc_lens:
            if c + n_clauses > len(clause_lens) or w + 12 * n_clauses > len(draws):
                break
            parts: list[str] = []
            for _ in range(n_clauses):
                n = clause_lens[c]
                parts.append("".join([words[i] for i in draws[w:w + n]]))
                w += n
                if numbers[c] % 17 == 0:
                    parts.append(str(numbers[c]))
                parts.append(PUNCT[puncts[c]])
                c += 1
            yield "".join(parts)


def write_corpus(path: Path, n_bytes: int, seed: int = 0, as_jsonl: bool = True) -> int:
    """Write synthetic documents to `path` until it holds at least `n_bytes`; returns the number of documents."""
    n_docs = size = 0
    with open(path, "w", encoding="utf-8") as f:
        for doc in synthetic_documents(seed):
            line = json.dumps({"text": doc}, ensure_ascii=False) if as_jsonl else doc
            f.write(line + "\n")
            size += len(line.encode("utf-8")) + 1
            n_docs += 1
            if size >= n_bytes:
                break
    return n_docs


def _vm_hwm_mb() -> int:
    """Peak resident memory of this process since exec (VmHWM). ru_maxrss would also count the parent's
    pages at fork time, which Linux carries across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) // 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024


def _child(job: str, kwargs: dict) -> dict:
    """Runs in a fresh interpreter: the measured job, then its wall/CPU time and peak memory.

    A thread samples the resident memory of this process plus its descendants (pack's workers) every 20 ms;
    the peak of that sum is what the machine must hold.
    """
    import threading

    import psutil

    stop = threading.Event()
    peak = [0]

    def sample() -> None:
        me = psutil.Process()
        while not stop.is_set():
            try:
                rss = me.memory_info().rss + sum(c.memory_info().rss for c in me.children(recursive=True))
                peak[0] = max(peak[0], rss)
            except psutil.Error:
                pass
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    if job == "tokenize":
        from matelike.tokenizer import train_tokenizer

        train_tokenizer(**kwargs, progress=False)
    elif job == "encode":
        # The tokenizer library alone on text already in memory: the ceiling for packing with this tokenizer.
        from matelike.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(kwargs["tokenizer_dir"])
        with open(kwargs["corpus"], encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        for i in range(0, len(texts), 1000):
            tokenizer.encode_batch(texts[i:i + 1000])
        return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0,
                "peak_rss_mb": _vm_hwm_mb(), "main_peak_rss_mb": _vm_hwm_mb()}
    else:
        from matelike.data.pack import pack

        pack(**kwargs, progress=False)
    wall = time.perf_counter() - t0
    stop.set()
    sampler.join()
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    main_peak = _vm_hwm_mb()
    return {"seconds": wall, "cpu_seconds": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
            "peak_rss_mb": max(main_peak, peak[0] // (1 << 20)), "main_peak_rss_mb": main_peak}


def _measure(job: str, **kwargs: object) -> dict:
    """Run `_child(job, kwargs)` in a fresh Python (so the peak RSS is the job's alone, not ours or the CLI's)."""
    code = ("import json, sys; from matelike.bench.corpus import _child; "
            "print(json.dumps(_child(sys.argv[1], json.loads(sys.argv[2]))))")
    r = subprocess.run([sys.executable, "-c", code, job, json.dumps(kwargs, default=str)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise RuntimeError(f"bench {job} child failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _workdir(args: argparse.Namespace):
    return tempfile.TemporaryDirectory(prefix="matelike-bench-", dir=args.tmp_dir)
