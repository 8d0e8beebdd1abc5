"""Evaluation speed: ``mergescale eval`` against lm-evaluation-harness (HF backend) on the same tasks.

Setup (issue #6): a small random Llama (hidden 256, 4 layers, about 4M parameters) with a word-level tokenizer;
four multiple-choice tasks of 500 examples with 4 choices each, contexts of 40-80 words and choices of 2-8
words; CPU. The harness runs the same tasks through ``mergescale tasks export-lm-eval``, batch size 32.

Measured:
* whole process: ``mergescale eval`` vs ``lm_eval`` on the command line (import, model load, data, scoring,
  writing results), median of ``--repeats`` runs;
* in-process scoring throughput (examples per second), model already loaded: ``evaluate()`` on the model in
  memory (first call: tokenising included; second call: tokenised tasks cached) vs ``lm_eval.simple_evaluate``
  with an ``HFLM`` built once;
* predictions (acc's and acc_norm's argmax) of every example, which must be identical, and the largest
  difference between the two log-likelihoods of any choice.

    nice -n 10 python benchmarks/eval_speed.py                  # full setup, 3 repeats
    nice -n 10 python benchmarks/eval_speed.py --examples 100 --repeats 1     # quick look
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _common import BENCH_DIR, machine, median, run_process  # noqa: E402

TARGET_PROCESS_RATIO = 1 / 3  # our whole-process time at most this fraction of the harness's
TARGET_THROUGHPUT_RATIO = 3.0  # our scoring throughput at least this multiple of the harness's


def build_world(
    root: Path, *, n_examples: int, n_tasks: int, vocab_words: int, seed: int = 0
) -> tuple[Path, Path]:
    """The model folder (random Llama + word-level tokenizer) and a suite of multiple-choice tasks."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(seed)
    letters = "bcdfghjklmnprstvwz"
    vowels = "aeiou"
    words: set[str] = set()
    while len(words) < vocab_words:
        words.add("".join(rng.choice(letters) + rng.choice(vowels) for _ in range(rng.randint(1, 3))))
    word_list = sorted(words)
    model_dir = root / "model"
    if not (model_dir / "config.json").is_file():
        vocab = ["<unk>", "<pad>", "<s>", "</s>", ".", "?", ":", *word_list]
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
        )
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(vocab), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512, bos_token_id=2,
            eos_token_id=3, tie_word_embeddings=False, initializer_range=0.1,
        )  # fmt: skip
        model = LlamaForCausalLM(config)
        tmp = root / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(model_dir)
    suite_dir = root / f"tasks-{n_tasks}x{n_examples}"
    if not (suite_dir / "suite.yaml").is_file():
        tmp = suite_dir.with_name(suite_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)

        def text(lo: int, hi: int) -> str:
            return " ".join(rng.choice(word_list) for _ in range(rng.randint(lo, hi)))

        names = []
        for t in range(n_tasks):
            name = f"bench_mc{t}"
            names.append(f"{name}/task.yaml")
            folder = tmp / name
            folder.mkdir(parents=True)
            rows = [
                {
                    "context": text(40, 80) + " ?",
                    "choices": [text(2, 8) for _ in range(4)],
                    "gold": rng.randrange(4),
                }
                for _ in range(n_examples)
            ]
            (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            spec = {
                "name": name,
                "category": f"cat{t % 2}",
                "kind": "multiple_choice",
                "data": {"test": "test.jsonl"},
            }
            (folder / "task.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        (tmp / "suite.yaml").write_text(yaml.safe_dump({"name": "bench", "held_in": names}))
        tmp.rename(suite_dir)
    return model_dir, suite_dir / "suite.yaml"


def harness_predictions(samples_dir: Path) -> dict[tuple[str, int], tuple[list[float], int, int]]:
    """(task, doc) -> (log-likelihoods, acc's pred, acc_norm's pred) from the harness's samples files."""
    out = {}
    for file in glob.glob(str(samples_dir / "**" / "samples_*.jsonl"), recursive=True):
        task = Path(file).name.removeprefix("samples_").rsplit("_", 1)[0]
        for line in Path(file).read_text().splitlines():
            s = json.loads(line)
            lls = [float(r[0][0]) for r in s["resps"]]  # the harness writes them as strings
            choices = s["doc"]["choices"]
            pred = max(range(len(lls)), key=lambda i: (lls[i], -i))
            pred_norm = max(range(len(lls)), key=lambda i: (lls[i] / len(choices[i]), -i))
            out[(task, s["doc_id"])] = (lls, pred, pred_norm)
    return out


def our_predictions(samples_file: Path) -> dict[tuple[str, int], tuple[list[float], int, int]]:
    out = {}
    for line in samples_file.read_text().splitlines():
        s = json.loads(line)
        out[(s["task"], s["index"])] = (s["loglikelihoods"], s["pred"], s["pred_norm"])
    return out


def compare(ours: dict, theirs: dict) -> tuple[int, int, float]:
    """(examples compared, examples whose acc or acc_norm prediction differs, largest log-likelihood gap)."""
    if set(ours) != set(theirs):
        raise SystemExit(f"different examples: ours {len(ours)}, harness {len(theirs)}")
    differ, gap = 0, 0.0
    for key, (lls, pred, pred_norm) in ours.items():
        t_lls, t_pred, t_norm = theirs[key]
        differ += (pred, pred_norm) != (t_pred, t_norm)
        gap = max(gap, max(abs(a - b) for a, b in zip(lls, t_lls, strict=True)))
    return len(ours), differ, gap


def whole_process(
    model: Path, suite: Path, export_dir: Path, names: list[str], out: Path, repeats: int, env: dict
):
    ours_t, theirs_t = [], []
    mergescale = shutil.which("mergescale") or "mergescale"
    lm_eval = shutil.which("lm_eval") or "lm_eval"
    for r in range(repeats):
        ours_dir, theirs_dir = out / f"ours{r}", out / f"harness{r}"
        shutil.rmtree(ours_dir, ignore_errors=True)
        shutil.rmtree(theirs_dir, ignore_errors=True)
        run = run_process(
            [mergescale, "eval", str(model), "--tasks", str(suite), "--output", str(ours_dir / "results.json"),
             "--batch-size", "32", "--log-samples", "--quiet"], env=env,
        )  # fmt: skip
        if run.returncode:
            raise SystemExit(f"mergescale eval failed:\n{run.output}")
        ours_t.append(run.seconds)
        run = run_process(
            [lm_eval, "--model", "hf", "--model_args", f"pretrained={model},dtype=float32", "--tasks", ",".join(names),
             "--include_path", str(export_dir), "--batch_size", "32", "--device", "cpu", "--log_samples",
             "--output_path", str(theirs_dir)], env=env,
        )  # fmt: skip
        if run.returncode:
            raise SystemExit(f"lm_eval failed:\n{run.output}")
        theirs_t.append(run.seconds)
        print(
            f"  whole process, run {r + 1}: mergescale {ours_t[-1]:.2f} s, lm_eval {theirs_t[-1]:.2f} s",
            flush=True,
        )
    n, differ, gap = compare(our_predictions(ours_dir / "samples.jsonl"), harness_predictions(theirs_dir))
    return median(ours_t), median(theirs_t), (n, differ, gap)


def in_process(model_dir: Path, suite: Path, export_dir: Path, names: list[str], repeats: int):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergescale.evaluate import evaluate, load_suite

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    suite_obj = load_suite(suite)
    n = sum(len(t.rows()) for t in suite_obj.tasks)
    first = [time.perf_counter()]
    evaluate(model, suite_obj, tokenizer=tokenizer, progress=False)  # tokenises and caches
    first_s = time.perf_counter() - first[0]
    ours = []
    for _ in range(repeats):
        t = time.perf_counter()
        evaluate(model, suite_obj, tokenizer=tokenizer, progress=False)
        ours.append(time.perf_counter() - t)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=32, backend="causal")
    manager = TaskManager(include_path=str(export_dir))
    theirs = []
    for _ in range(repeats):
        t = time.perf_counter()
        lm_eval.simple_evaluate(
            model=lm, tasks=names, task_manager=manager, bootstrap_iters=0, verbosity="ERROR"
        )
        theirs.append(time.perf_counter() - t)
    return n, first_s, median(ours), median(theirs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=500, help="examples per task")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2000, help="words in the tokenizer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, for both contenders")
    parser.add_argument("--skip-process", action="store_true", help="only the in-process comparison")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    env = {
        "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_CACHE": str(BENCH_DIR / "eval" / "hf-datasets"),
    }  # fmt: skip
    os.environ.update(env)
    root = BENCH_DIR / "eval"
    root.mkdir(parents=True, exist_ok=True)
    model_dir, suite = build_world(root, n_examples=args.examples, n_tasks=args.tasks, vocab_words=args.vocab)
    from mergescale.evaluate.export import export_lm_eval
    from mergescale.evaluate.tasks import load_tasks

    export_dir = root / f"lm-eval-{args.tasks}x{args.examples}"
    names = [p.stem for p in export_lm_eval(load_tasks(suite), export_dir)]
    n_params = sum(
        p.numel()
        for p in __import__("transformers").AutoModelForCausalLM.from_pretrained(model_dir).parameters()
    )
    print(f"machine: {machine()}, torch threads {args.threads}")
    print(
        f"model: random Llama, {n_params / 1e6:.1f}M parameters; {args.tasks} tasks x {args.examples} examples x 4 choices"
    )

    if not args.skip_process:
        ours_s, theirs_s, (n, differ, gap) = whole_process(
            model_dir, suite, export_dir, names, root / "runs", args.repeats, env
        )
        ratio = ours_s / theirs_s
        print(f"whole process (median of {args.repeats}): mergescale {ours_s:.2f} s, lm_eval {theirs_s:.2f} s, "
              f"ratio {ratio:.3f} (target <= {TARGET_PROCESS_RATIO:.3f}) {'OK' if ratio <= TARGET_PROCESS_RATIO else 'MISSED'}")  # fmt: skip
        print(
            f"predictions: {n} examples compared, {differ} differ (acc or acc_norm); largest log-likelihood gap {gap:.2e}"
        )

    n, first_s, ours_s, theirs_s = in_process(model_dir, suite, export_dir, names, args.repeats)
    speedup = theirs_s / ours_s
    print(f"in-process scoring, {n} examples (median of {args.repeats}): mergescale {n / ours_s:.0f} ex/s "
          f"({ours_s:.2f} s; first call with tokenising {n / first_s:.0f} ex/s), lm_eval {n / theirs_s:.0f} ex/s "
          f"({theirs_s:.2f} s); speed-up {speedup:.2f}x (target >= {TARGET_THROUGHPUT_RATIO:.0f}x) "
          f"{'OK' if speedup >= TARGET_THROUGHPUT_RATIO else 'MISSED'}")  # fmt: skip


if __name__ == "__main__":
    main()
