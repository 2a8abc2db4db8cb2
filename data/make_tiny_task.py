"""Generate the bundled tiny task deterministically: preference data, pretraining corpus, tokenizer.

    python data/make_tiny_task.py          # rewrites data/tiny_task, data/ptx_corpus.txt, data/tiny_tokenizer

The task and its gold reward are defined in rlhf_core/data/tiny_task.py. The preference data uses DeepSpeed-Chat's
local layout (data/train.json and data/eval.json with prompt/chosen/rejected, one JSON object per line).
The tokenizer is a word-level tokenizer over the task's vocabulary, with a BOS token and a chat template
that renders the same " Human: ... Assistant:" text as DeepSpeed-Chat's format.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from rlhf_core.data import tiny_task as gold  # noqa: E402

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}Human: {{ m['content'] }} {% else %}Assistant: {{ m['content'] }} {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + gold.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    # Name the class every transformers 5.x release knows, not the alias this one happens to write.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=20261122)
    ap.add_argument("--train-rows", type=int, default=4000)
    ap.add_argument("--eval-rows", type=int, default=600)
    ap.add_argument("--corpus-lines", type=int, default=3000)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    write_jsonl(HERE / "tiny_task" / "data" / "train.json", [gold.sample_pair(rng) for _ in range(args.train_rows)])
    write_jsonl(HERE / "tiny_task" / "data" / "eval.json", [gold.sample_pair(rng) for _ in range(args.eval_rows)])
    (HERE / "ptx_corpus.txt").write_text("".join(gold.sample_corpus_line(rng) + "\n" for _ in range(args.corpus_lines)))
    build_tokenizer(HERE / "tiny_tokenizer")
    print(f"wrote {args.train_rows}+{args.eval_rows} preference rows, {args.corpus_lines} corpus lines, tokenizer")


if __name__ == "__main__":
    main()
