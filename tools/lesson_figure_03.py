"""Redraw lessons/figures/03-replay-and-self-generated-data.png from notebook 03's committed COURSEKIT_RESULT line.

Run from the repository root: .venv/bin/python tools/lesson_figure_03.py"""
import json, matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
nb = json.load(open("notebooks/03_replay_and_self_generated_data.ipynb"))
line = [l for c in nb["cells"] for o in c.get("outputs", []) for l in "".join(o.get("text", "")).splitlines() if l.startswith("COURSEKIT_RESULT")][0]
m = json.loads(line.split(" ", 1)[1])["metrics"]
runs = [k.split("|")[0] for k in m if k.endswith("|learn") and not k.startswith("safety")]
style = {"plain FT (gold)": ("s", "tab:blue"), "LoRA r=8 (q, v)": ("D", "tab:orange"), "experience replay 5%": ("o", "tab:green"),
         "experience replay 25%": ("o", "tab:red"), "pseudo replay 25%": ("s", "tab:purple"), "Magpie 25%": ("s", "tab:brown"),
         "SSR 25%": ("s", "tab:pink"), "self-output targets": ("s", "tab:gray"), "paraphrase targets": ("s", "tab:olive"),
         "token masking (ppl>2.5)": ("s", "tab:cyan")}
fig, ax = plt.subplots(1, 3, figsize=(13.5, 3.9))
for r in runs:
    mk, col = style.get(r, ("s", "k"))
    for a, x in ((ax[0], 1 - m[f"{r}|json"]), (ax[1], m[f"{r}|old_forgetting"])):
        a.scatter(x, m[f"{r}|learn"], marker=mk, c=col, s=45, zorder=3)
        a.annotate(r, (x, m[f"{r}|learn"]), xytext=(4, 3), textcoords="offset points", fontsize=7)
for a, x in ((ax[0], 1 - m["base_json"]), (ax[1], 0.0)):
    a.scatter(x, m["base_learn"], marker="*", c="k", s=120, zorder=4)
    a.annotate("aligned model", (x, m["base_learn"]), xytext=(4, -10), textcoords="offset points", fontsize=7)
ax[0].set(xlabel="forgetting: JSON ability lost", ylabel="learning: emotion accuracy", title="JSON ability lost vs learning", ylim=(-0.05, 1.05))
ax[1].set_xscale("symlog", linthresh=1.0)
ax[1].set(xlabel="forgetting: old-answer cross-entropy rise (symlog)", ylabel="learning: emotion accuracy", title="old answers forgotten vs learning", ylim=(-0.05, 1.05))
names = ["safe model (before)", "plain FT (gold)", "safety replay 5%", "safety replay 15%"]
xs = range(len(names))
ax[2].bar([x - 0.2 for x in xs], [m[f"safety|{n}|refuse"] for n in names], 0.4, label="refuses harmful (held-out)", color="tab:blue")
ax[2].bar([x + 0.2 for x in xs], [m[f"safety|{n}|over_refuse"] for n in names], 0.4, label="refuses benign look-alikes", color="tab:orange")
ax[2].axhline(m["refusal_before_safety_stage"], ls=":", c="k", lw=0.8, label="before the safety stage")
ax[2].set_xticks(list(xs)); ax[2].set_xticklabels(["safe model\n(before)", "plain FT (gold)", "replay 5%", "replay 15%"], fontsize=7)
ax[2].set(ylabel="refusal rate", title="safety replay", ylim=(0, 1.05)); ax[2].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
for a in ax[:2]:
    a.grid(alpha=0.3)
fig.suptitle("Notebook 03 (ci profile): 8 steps x batch 4, one seed, 10 held-out items per score: illustrations, not verdicts", fontsize=10)
fig.tight_layout()
fig.savefig("lessons/figures/03-replay-and-self-generated-data.png", dpi=90)
