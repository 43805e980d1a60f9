"""Build ``avss_fast/assets/hallucination_demo.jsonl``: the built-in data of
``avss-fast hallucination`` (``score_hallucination`` on the demo language model).

Each line is ``{"prompt", "truthful", "hallucinated", "work", "passage"}``:

* the passages are ``avss_fast.demo_texts("heldout")`` (Shakespeare works the demo
  model never saw in training); every fifth passage is used (indices 2, 7, 12, ...);
* in a passage, the answer line is the first line ``j >= 3`` that is spoken text (not
  blank, not a speaker's name such as ``BRUTUS.``, not an all-capital heading, not a
  ``[stage direction]``), 25 to 70 characters long and without surrounding spaces, whose
  two preceding lines are spoken text too (so the answer continues a speech);
* ``prompt`` = the whole lines just before it, as many as fit in 180 characters (at least
  one), joined by newlines and ending with a newline;
* ``truthful`` = the answer line itself (the text's own continuation);
* ``hallucinated`` = a continuation written by hand for this project (table ``WRONG``
  below, keyed by passage index): the same style, metre and roughly the same length, but
  wrong: another name, place, number or object, or the opposite statement (e.g. "heap'd
  on Caesar" -> "heap'd on Pompey", "twelve winters" -> "forty summers").

Nothing is random: the same held-out texts always give the same file, and the script
fails if a selected line is not the one the table was written for.

Run from the repository root: ``python scripts/make_hallucination_demo.py`` (``--check``
only verifies that the shipped file is up to date).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "avss_fast" / "assets" / "hallucination_demo.jsonl"
STRIDE, OFFSET = 5, 2  # passages 2, 7, 12, ...
MIN_LEN, MAX_LEN, PROMPT_CHARS = 25, 70, 180

_SPEAKER = re.compile(r"^[A-Z][A-Z' ,\-]*\.$")

# passage index -> (the text's own line, the hand-written wrong continuation)
WRONG: dict[int, tuple[str, str]] = {
    2: ("perfect gallows. Stand fast, good Fate, to his hanging!",
        "perfect drowning. Stand fast, good Neptune, to his sinking!"),
    7: ("But blessedly holp hither.", "But cruelly drown'd at sea."),
    12: ("To swim, to dive into the fire, to ride", "To sing, to sleep upon the ground, to weep"),
    17: ("Thou hast howl'd away twelve winters.", "Thou hast sung away forty summers."),
    22: ("It carries a brave form:--but 'tis a spirit.", "It carries a foul form:--but 'tis a monster."),
    27: ("Is much beyond our loss. Our hint of woe", "Is nothing to our loss. Our hint of joy"),
    32: ("But rather lose her to an African;", "But rather give her to a Venetian;"),
    37: ("You more invest it! Ebbing men indeed,", "You more forsake it! Rising men indeed,"),
    42: ("By inch-meal a disease! His spirits hear me,", "By inch-meal a king! His daughter hears me,"),
    47: ("--The Man i' the Moon! A most poor credulous", "--The Duke o' Milan! A most rich and learned"),
    52: ("I would not so!--and would no more endure", "I would it were so!--and would gladly endure"),
    57: ("drinking do.--A murrain on your monster, and the devil",
         "singing do.--A blessing on your master, and the saints"),
    62: ("And I'll be sworn 'tis true: travellers ne'er did lie,",
         "And I'll be sworn 'tis false: travellers ever do lie,"),
    67: ("If thou dost break her virgin knot before", "If thou dost leave her on this isle before"),
    72: ("There's something else to do: hush, and be mute,", "There's nothing else to do: speak, and be merry,"),
    77: ("And do the murder first. If he awake,", "And drink the wine first. If he sleep,"),
    82: ("Thou shalt ere long be free.", "Thou shalt for ever serve me."),
    87: ("I chose her when I could not ask my father", "I bought her when I went to ask my mother"),
    92: ("For this one night; which--part of it--I'll waste",
         "For twelve long years; which--most of them--I'll spend"),
    97: ("Draw them to Tiber banks, and weep your tears", "Draw them to Nilus banks, and laugh your fill"),
    102: ("For some new honors that are heap'd on Caesar.", "For some new honors that are heap'd on Pompey."),
    107: ("shook their heads; but for mine own part, it was Greek to me. I",
          "clapped their hands; but for mine own part, it was Latin to me. I"),
    112: ("But, woe the while! our fathers' minds are dead,", "But, joy the while! our mothers' minds are strong,"),
    117: ("This paper thus seal'd up, and I am sure", "This dagger thus laid by, and I am sure"),
    122: ("Like wrath in death, and envy afterwards;", "Like mercy in death, and pity afterwards;"),
    127: ("Is it excepted I should know no secrets", "Is it commanded I should keep your secrets"),
    132: ("And tell them that I will not come to-day.", "And tell them that I will come at noon to-day."),
    137: ("I shall beseech him to befriend himself.", "I shall beseech him to forsake the Senate."),
    142: ("Nor to no Roman else: so tell them, Publius.", "Nor to no Gaul else: so tell them, Cinna."),
    147: ("Then, in a friend, it is cold modesty.", "Then, in a foe, it is hot treachery."),
    152: ("enroll'd in the Capitol, his glory not extenuated, wherein he",
          "burnt in the Forum, his glory much extenuated, wherein he"),
    157: ("The first time ever Caesar put it on;", "The last time ever Pompey put it on;"),
    162: ("to Casca's, some to Ligarius': away, go!", "to Cicero's, some to Octavius': stay, stay!"),
    167: ("Before the eyes of both our armies here,", "Before the walls of Rome and Senate here,"),
    172: ("Do what you will, dishonor shall be humour.", "Do what you will, I shall strike you down."),
    177: ("Do stand but in a forced affection;", "Do stand most firm in true affection;"),
    182: ("But keep the hills and upper regions:", "But keep the ships and lower rivers:"),
    187: ("He bears too great a mind. But this same day", "He bears too weak a heart. But this same night"),
    192: ("In our own proper entrails.", "Against our Roman foes."),
    197: ("Thy life hath had some smack of honor in it:", "Thy life hath had no smack of honor in it:"),
    202: ("Ago I went from hence; and then 'twas fresh", "Ago I came from Venice; and then 'twas stale"),
    207: ("or an ordinary man has; but I am great eater of beef, and, I",
          "or an ordinary man has; but I am great drinker of milk, and, I"),
    212: ("Whoe'er I woo, myself would be his wife.", "Whoe'er I woo, myself would wed Sebastian."),
    217: ("one of thy kin, has a most weak pia mater.", "one of thy kin, has a most strong wit indeed."),
    222: ("maidenhead: to your ears, divinity; to any other's, profanation.",
          "the grave: to your ears, profanation; to any other's, divinity."),
    227: ("modesty, that you will not extort from me what I am willing to",
          "boldness, that you will surely extort from me what I am loath to"),
    232: ("a catch that will draw three souls out of one weaver? shall we do",
          "a psalm that will draw ten souls out of one tailor? shall we do"),
    237: ("he shall find the letter; observe his construction of it. For",
          "he shall find the ring; observe his burning of it. For"),
    242: ("Prizes not quantity of dirty lands;", "Prizes great quantity of golden lands;"),
    247: ("is in contempt of question, her hand.", "is beyond all question, her sister's hand."),
    252: ("stockings, and 'tis a colour she abhors, and cross-gartered, a",
          "stockings, and 'tis a colour she adores, and cross-gartered, a"),
    257: ("You are servant to the Count Orsino, youth.", "You are servant to the Duke Antonio, youth."),
    262: ("him in eleven places; my niece shall take note of it: and assure",
          "him in twenty places; my aunt shall take note of it: and assure"),
    267: ("For, sure, the man is tainted in his wits.", "For, sure, the man is perfect in his wits."),
    272: ("our pleasure and his penance, till our very pastime, tired out of",
          "our sorrow and his pleasure, till our very master, tired out of"),
    277: ("that put quarrels purposely on others to taste their valour:",
          "that put money purposely on others to taste their wealth:"),
    282: ("And part being prompted by your present trouble,", "And part being paid for by your present master,"),
    287: ("Against thy peace. Go with me to my house,", "Against thy peace. Go with me to the sea,"),
    292: ("advantage thee more than ever the bearing of letter did.",
          "advantage thee less than ever the singing of songs did."),
    297: ("As black as Vulcan in the smoke of war:", "As white as Dian in the snow of peace:"),
    302: ("Or will not else thy craft so quickly grow", "Or will not else thy beard so slowly grow"),
    307: ("should have given it you to-day morning, but as a madman's",
          "should have burnt it yesterday evening, but as a madman's"),
}


def _is_text(line: str) -> bool:
    s = line.strip()
    return bool(s) and not s.startswith("[") and not _SPEAKER.match(s) and not s.isupper()


def select(passage: str) -> tuple[str, str] | None:
    """(prompt, truthful line) of one passage by the rule in the module docstring, or None."""
    lines = passage.split("\n")
    for j in range(3, len(lines)):
        line = lines[j]
        if not (_is_text(line) and _is_text(lines[j - 1]) and _is_text(lines[j - 2])):
            continue
        if line != line.strip() or not MIN_LEN <= len(line) <= MAX_LEN:
            continue
        k = j - 1
        while k > 0 and len("\n".join(lines[k - 1 : j])) <= PROMPT_CHARS:
            k -= 1
        return "\n".join(lines[k:j]) + "\n", line
    return None


def build() -> list[dict]:
    import json as _json

    # Read the held-out texts directly (the same file demo_texts("heldout") reads), so the
    # script needs neither torch nor an installed avss_fast.
    src = OUT.parent / "demo_texts" / "heldout.jsonl"
    rows = [_json.loads(x) for x in src.read_text(encoding="utf-8").splitlines() if x.strip()]
    records = []
    for i in range(OFFSET, len(rows), STRIDE):
        picked = select(rows[i]["text"])
        if picked is None:
            continue
        prompt, truthful = picked
        if i not in WRONG:
            raise SystemExit(f"passage {i}: no hand-written continuation for {truthful!r}; add one to WRONG")
        expected, wrong = WRONG[i]
        if expected != truthful:
            raise SystemExit(f"passage {i}: selected {truthful!r}, but WRONG was written for {expected!r}")
        if wrong == truthful:
            raise SystemExit(f"passage {i}: the hallucinated continuation equals the text")
        records.append(dict(prompt=prompt, truthful=truthful, hallucinated=wrong, work=rows[i]["work"], passage=i))
    unused = sorted(set(WRONG) - {r["passage"] for r in records})
    if unused:
        raise SystemExit(f"WRONG has entries for passages that were not selected: {unused}")
    return records


def render(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only check that the shipped file is up to date")
    args = ap.parse_args(argv)
    text = render(build())
    if args.check:
        ok = OUT.is_file() and OUT.read_text(encoding="utf-8") == text
        print(f"{OUT}: {'up to date' if ok else 'OUT OF DATE'}")
        return 0 if ok else 1
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {text.count(chr(10))} records to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
