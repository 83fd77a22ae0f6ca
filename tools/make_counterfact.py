"""Writes data/counterfact.jsonl: CounterFact-style edits whose neighbours share the relation *and* the
true object (Meng et al. 2022), so an edit that bleeds into the object ("every French city is now in
Germany") shows up as a neighbourhood failure. Every subject and neighbour was checked to be known by
SmolLM2-135M-Instruct (greedy first token = the true object's; notebook 04 re-checks the edits).
Neighbour subjects are never edited subjects, so sequential edits never score an edited subject as a
neighbour. Run from the repository root: python tools/make_counterfact.py
"""
import json
from pathlib import Path

# unrelated opening sentences for the prefixed paraphrases (CounterFact's paraphrases carry one)
NOISE = ["The weather was mild all week.", "She closed the book and smiled.", "Prices rose again in the spring.",
         "The match ended in a draw.", "He forgot his umbrella at home.", "The garden needs water.",
         "A new phone was released today.", "The meeting lasted two hours."]
COUNTRY = {  # true object: ([(edited subject, new object)], [neighbour subjects])
    "France": ([("Lyon", "Germany"), ("Marseille", "Spain")], ["Bordeaux", "Toulouse", "Nice"]),
    "Germany": ([("Munich", "France"), ("Hamburg", "Italy")], ["Frankfurt", "Cologne", "Stuttgart"]),
    "Japan": ([("Osaka", "China"), ("Kyoto", "India")], ["Hiroshima", "Yokohama", "Tokyo"]),
    "China": ([("Shanghai", "Japan"), ("Shenzhen", "Brazil")], ["Beijing", "Guangzhou"]),
    "India": ([("Mumbai", "Egypt"), ("Bangalore", "Canada")], ["Delhi", "Chennai"]),
    "Canada": ([("Toronto", "Australia")], ["Vancouver", "Ottawa", "Calgary"]),
    "Australia": ([("Sydney", "Canada")], ["Melbourne", "Brisbane"]),
    "Brazil": ([("Rio de Janeiro", "Mexico")], ["São Paulo", "Brasília"]),
    "Russia": ([("Moscow", "Germany")], ["Saint Petersburg", "Novosibirsk"]),
    "Spain": ([("Madrid", "Italy")], ["Barcelona", "Valencia"]),
}
CITY = {
    "New York": ([("The Statue of Liberty", "London"), ("The Empire State Building", "Chicago")],
                 ["Times Square", "The Brooklyn Bridge", "Wall Street", "Broadway"]),
    "Paris": ([("The Eiffel Tower", "Rome")], ["The Louvre", "The Champs-Élysées"]),
    "Rome": ([("The Colosseum", "Paris")], ["The Pantheon", "The Roman Forum", "Vatican City"]),
    "Berlin": ([("The Reichstag", "Vienna")], ["The Brandenburg Gate", "The Berlin Wall"]),
    "Athens": ([("The Parthenon", "Cairo")], ["The Acropolis"]),
    "Washington": ([("The White House", "Boston")], ["The Capitol", "The Washington Monument"]),
}
RELATIONS = {  # relation: (groups, prompt, plain paraphrase, prefixed paraphrase)
    "country": (COUNTRY, "{} is a city in the country of", "{} is located in the country of",
                "{} The city of {} lies in the country of"),
    "city": (CITY, "{} is located in the city of", "{} stands in the city of", "{} Tourists visit {} in the city of"),
}


def records():
    i = 0
    for rel, (groups, prompt, para, para_prefixed) in RELATIONS.items():
        for obj, (edits, neighbours) in groups.items():
            for subj, new in edits:
                lower = subj[0].lower() + subj[1:] if subj.startswith("The ") else subj
                yield {"id": subj.lower().replace("the ", "").replace(" ", "_").replace("ã", "a"),
                       "subject": subj, "prompt": prompt.format(subj), "target_true": " " + obj,
                       "target_new": " " + new, "relation": rel,
                       "paraphrases": [para.format(subj), para_prefixed.format(NOISE[i % len(NOISE)], lower)],
                       "neighbourhood": [{"prompt": prompt.format(n), "target": " " + obj} for n in neighbours]}
                i += 1


if __name__ == "__main__":
    out = Path("data/counterfact.jsonl")
    head = ("// CounterFact-style counterfactual edits of facts SmolLM2-135M-Instruct knows; neighbours share the relation"
            " and the true object. Written by tools/make_counterfact.py. Schema: coursekit/rome.py docstring.\n")
    out.write_text(head + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records()), encoding="utf-8")
    print(sum(1 for _ in records()), "records ->", out)
