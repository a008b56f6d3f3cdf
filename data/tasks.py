"""The built-in tasks: what each one asks, how its prompts are phrased, and its answers.

Each task is a domain in the paper's sense: (prompt -> response) records, routed as a whole from the
prompt. Every prompt is an instruction in plain words plus its input, and ends with a newline; the
response is the answer alone:

    upper    "Convert this word to uppercase: tiger"       -> "TIGER"
    lower    "please write 'TiGer' in small letters"       -> "tiger"
    double   "tiger -- double every letter"                -> "ttiiggeerr"
    reverse  "Spell TIGER backwards."                      -> "REGIT"
    arith    "What is 45 plus 7?"                          -> "52"
    count    "how many letters are in tiger"               -> "5"      (held back: added later)

Two kinds of pair, on purpose. upper and lower read the same inputs and want opposite things of them
(an inverse map: one LoRA trained on both must keep them apart), while upper, lower, double and
reverse all copy the input letter by letter (a skill one LoRA can share); arith shares nothing. The
word tasks take the same inputs (a word of 3 to 6 letters, in lower, Title or UPPER case), so only the
instruction says which task a prompt is.

Phrasing. A prompt is an instruction pattern of its task ("convert {x} to uppercase") set in a frame
("{I}: {w}", "Word: {w}. {I}.") with decorations drawn the same way for every task: a polite opener,
the casing of the instruction, quotes around the word, end punctuation. No task owns a style, so a
router must read the instruction's words. Patterns and frames are split: the training family (train
and val records) crosses the training patterns with the training frames; the unseen family uses only
pairs with an unseen pattern or an unseen frame, and no split trains on it. Its words are the
validation words. HAND_WRITTEN holds prompts written by hand, as people type, for each task.

The skills: `skill_documents` writes text in which the words and sums appear transformed, without
any instruction ("tiger TIGER", "45 + 7 = 52"), one transformation per document, so a base trained on
it can do each task once told which (data/prepare.py adds it to the corpus as the source `skills`).

Read next: data/prepare.py.
"""

import functools
import random
import re

WORD_TASKS = {
    "upper": str.upper,
    "lower": str.lower,
    "double": lambda w: "".join(c + c for c in w),
    "reverse": lambda w: w[::-1],
    "count": lambda w: str(len(w)),
}
TASKS = ["upper", "lower", "double", "reverse", "arith", "count"]
HELD_BACK = ["count"]

# Instruction patterns: {x} is the thing to work on, a pointer ("this word") or the word itself.
PATTERNS = {
    "upper": [
        "uppercase {x}",
        "convert {x} to uppercase",
        "make {x} uppercase",
        "write {x} in capital letters",
        "put {x} in all caps",
        "change {x} to upper case",
        "turn {x} into capitals",
        "capitalize every letter of {x}",
        "spell {x} in capitals",
        "rewrite {x} in upper-case letters",
        "give me {x} in block capitals",
        "upper case {x}",
        "all caps for {x}",
        "write {x} in big letters",
    ],
    "lower": [
        "lowercase {x}",
        "convert {x} to lowercase",
        "make {x} lowercase",
        "write {x} in small letters",
        "put {x} in lower case",
        "change {x} to lower-case",
        "turn {x} into small letters",
        "decapitalize {x}",
        "write {x} without capitals",
        "spell {x} in lowercase letters",
        "give me {x} in little letters",
        "lower case {x}",
        "no capitals for {x}",
        "remove the capitals from {x}",
    ],
    "double": [
        "double every letter of {x}",
        "double each letter in {x}",
        "write each letter of {x} twice",
        "repeat every letter of {x}",
        "duplicate each character of {x}",
        "say each letter of {x} two times",
        "stutter {x}",
        "write every character of {x} two times",
        "double the letters of {x}",
        "repeat each character in {x} twice",
        "give me {x} with doubled letters",
        "double up the letters in {x}",
        "write {x} with every letter doubled",
        "twice each letter of {x}",
    ],
    "reverse": [
        "reverse {x}",
        "spell {x} backwards",
        "write {x} in reverse order",
        "flip {x} around",
        "mirror {x}",
        "read {x} from right to left",
        "write {x} back to front",
        "reverse the letters of {x}",
        "turn {x} around",
        "invert the order of the letters in {x}",
        "spell {x} in reverse",
        "give me {x} backwards",
        "write {x} from the last letter to the first",
        "put the letters of {x} in reverse",
    ],
    "count": [
        "count the letters in {x}",
        "how many letters are in {x}",
        "what is the length of {x}",
        "number of letters in {x}",
        "how long is {x}",
        "count the characters of {x}",
        "give the letter count of {x}",
        "how many characters does {x} have",
        "tell me how many letters {x} has",
        "length of {x}",
        "letter count of {x}",
        "count how many letters {x} has",
    ],
    "arith": [  # {e}: an expression ("45 plus 7"); {v}: an imperative one ("add 45 and 7"), from EXPRESSIONS
        "what is {e}",
        "compute {e}",
        "{e} =",
        "calculate {e}",
        "{e}",
        "evaluate {e}",
        "work out {e}",
        "what's {e}",
        "{v}",
        "how much is {e}",
        "find {e}",
        "{e} equals",
    ],
}
UNSEEN_PATTERNS = {
    "upper": [
        "{x}, but uppercase",
        "transform {x} into uppercase letters",
        "make every letter of {x} a capital",
        "caps lock on for {x}",
    ],
    "lower": [
        "{x}, but lowercase",
        "transform {x} into lowercase letters",
        "make every letter of {x} small",
        "caps lock off for {x}",
    ],
    "double": [
        "{x}, with each letter twice",
        "make every letter of {x} appear twice",
        "print each letter of {x} two times",
        "duplicate the letters in {x}",
    ],
    "reverse": [
        "{x}, reversed",
        "show {x} spelled backwards",
        "reverse the order of {x}",
        "write {x} from end to start",
    ],
    "count": [
        "{x}: how many letters",
        "find the length of {x}",
        "how many characters are in {x}",
        "the number of letters of {x}",
    ],
    "arith": ["tell me {e}", "{e}, what do you get", "figure out {e}", "give me {e}"],
}
# Arithmetic: a op b with a in 0..99 and b in 0..9, as an expression {e} or an imperative {v}.
EXPRESSIONS = {
    "+": ["{a} plus {b}", "{a} + {b}", "{a}+{b}", "the sum of {a} and {b}", "{a} and {b} added together"],
    "-": ["{a} minus {b}", "{a} - {b}", "{a}-{b}", "the difference of {a} and {b}", "{a} take away {b}"],
}
IMPERATIVES = {
    "+": ["add {a} and {b}", "add {b} to {a}", "increase {a} by {b}", "sum {a} and {b}"],
    "-": ["subtract {b} from {a}", "take {b} away from {a}", "decrease {a} by {b}", "deduct {b} from {a}"],
}
# Frames: {I} the instruction, {w} the word (quoted or not). The pointer {x} stands in for the word
# in every frame that shows the word apart; in the frames without {w} it is the word itself.
FRAMES = ["{I}: {w}", "{I}:\n{w}", "{w}\n{I}", "{I} -> {w}", "Word: {w}. {I}", "{w} -- {I}", "{I}", "{I} {w}"]
UNSEEN_FRAMES = ["Input: {w}\nTask: {I}", "I have the word {w}. {I}", "{I} for me: {w}"]
ARITH_FRAMES = ["{I}", "Question: {I}", "{I}, please"]
UNSEEN_ARITH_FRAMES = ["Quick one: {I}", "{I} (answer with a number)"]
POINTERS = ["this word", "the word", "it", "this"]
OPENERS = ["", "", "", "", "please "]
POLITE = ["can you ", "could you "]  # before an imperative only
VERBS = set(
    """uppercase convert make write put change turn capitalize spell rewrite give lowercase decapitalize
remove double repeat duplicate say stutter reverse flip mirror read invert count tell compute calculate evaluate
work find transform print show figure {v}""".split()
)
QUOTES = ["{}", "{}", "{}", "'{}'", '"{}"', "`{}`"]
ENDINGS = ["", "", ".", "!", "?"]

HAND_WRITTEN = {  # prompts written by hand, as people type, with their answers (not drawn from the patterns)
    "upper": [
        ("Convert to upper case: tiger", "TIGER"),
        ("make this word all caps: river", "RIVER"),
        ("uppercase please: garden", "GARDEN"),
        ("Can you write 'lemon' in capital letters?", "LEMON"),
        ("turn apple into uppercase", "APPLE"),
        ("capitalize all letters: music", "MUSIC"),
        ("Write dragon in upper case.", "DRAGON"),
        ("caps lock on: planet", "PLANET"),
    ],
    "lower": [
        ("Convert to lower case: TIGER", "tiger"),
        ("make this lowercase: RIVER", "river"),
        ("lowercase please: Garden", "garden"),
        ("Can you write 'LEMON' in small letters?", "lemon"),
        ("turn APPLE into lowercase", "apple"),
        ("Write Dragon in lower case.", "dragon"),
        ("no caps: MUSIC", "music"),
        ("all lowercase: PLANET", "planet"),
    ],
    "double": [
        ("double the letters: tiger", "ttiiggeerr"),
        ("Repeat each letter two times: cat", "ccaatt"),
        ("write every character twice: moon", "mmoooonn"),
        ("Double every letter in 'river'", "rriivveerr"),
        ("say each letter of apple twice", "aappppllee"),
        ("duplicate the letters of garden", "ggaarrddeenn"),
        ("Each letter twice, please: music", "mmuussiicc"),
        ("stutter: dog", "ddoogg"),
    ],
    "reverse": [
        ("reverse: tiger", "regit"),
        ("Spell river backwards.", "revir"),
        ("what is 'window' spelled backwards?", "wodniw"),
        ("Write garden in reverse.", "nedrag"),
        ("flip the letters of planet around", "tenalp"),
        ("please reverse this word: music", "cisum"),
        ("tiger backwards", "regit"),
        ("Mirror the word apple", "elppa"),
    ],
    "arith": [
        ("Add 23 and 4.", "27"),
        ("What is 45 plus 7?", "52"),
        ("Calculate 81-6.", "75"),
        ("what's 12 + 3", "15"),
        ("subtract 9 from 50", "41"),
        ("How much is 66 minus 8?", "58"),
        ("17+5=", "22"),
        ("compute 90 - 4", "86"),
    ],
    "count": [
        ("How many letters are in tiger?", "5"),
        ("count the letters: lemon", "5"),
        ("length of 'table'?", "5"),
        ("How long is the word sun?", "3"),
        ("number of letters in dragon", "6"),
        ("what's the letter count of apple", "5"),
        ("Count letters in river.", "5"),
        ("how many characters in music?", "5"),
    ],
}


@functools.lru_cache
def words(seed):
    """(train words, validation words): lower-case English words of 3 to 6 letters seen at least twice in the
    help topics of Python's docs, split 80 / 20 at random, so no validation word is ever trained on."""
    from pydoc_data.topics import topics

    counts = {}
    for text in topics.values():
        for w in re.findall(r"(?<![A-Za-z_.'-])[a-z]{3,6}(?![A-Za-z_.(-])", text):
            counts[w] = counts.get(w, 0) + 1
    found = sorted(w for w, n in counts.items() if n >= 2)
    random.Random(seed).shuffle(found)
    n_val = len(found) // 5
    return found[n_val:], found[:n_val]


def is_val_pair(a, b):
    """One (a, b) pair in ten is kept for validation and never trained on. The rule reads a's tens digit, so
    every pair of units digits (a % 10, b) is still seen in training."""
    return (a // 10 + b) % 10 == 0


def cased(w, rng):
    """A word as a user might type it: lower case (half the time), Title case or UPPER case."""
    return rng.choice([w, w, w.title(), w.upper()])


def decorate(pattern, instruction, rng):
    """The same decorations for every task: an opener (a polite one only before an imperative pattern),
    then the casing of the instruction: as is, Sentence case, or all capitals one time in ten."""
    openers = OPENERS + (POLITE if pattern.split()[0] in VERBS else [])
    text = rng.choice(openers) + instruction
    style = rng.random()
    if style < 0.1:
        return text.upper()
    return text[0].upper() + text[1:] if style < 0.55 else text


def phrasings(task, unseen=False):
    """The phrasing family of a task, as (pattern, frame) pairs: the training family crosses the training
    patterns with the training frames; the unseen family holds every pair with an unseen pattern or frame."""
    arith = task == "arith"
    patterns, frames = PATTERNS[task], ARITH_FRAMES if arith else FRAMES
    new_patterns, new_frames = UNSEEN_PATTERNS[task], UNSEEN_ARITH_FRAMES if arith else UNSEEN_FRAMES
    if not unseen:
        return [(p, f) for p in patterns for f in frames]
    return [
        (p, f) for p in patterns + new_patterns for f in frames + new_frames if p in new_patterns or f in new_frames
    ]


def word_prompt(pattern, frame, w, rng):
    """One prompt: the pattern set in the frame around the word w, decorated, ending with a newline. The word is
    put in last: the decorations (all capitals, say) change the instruction, never the word."""
    quoted = rng.choice(QUOTES).format(w)
    if "{w}" in frame:
        text = frame.format(I=decorate(pattern, pattern.format(x=rng.choice(POINTERS)), rng), w="\0")
    else:
        text = frame.format(I=decorate(pattern, pattern.format(x="\0"), rng))
    return end(text, rng).replace("\0", quoted)


def arith_prompt(pattern, frame, a, b, op, rng):
    """One arithmetic prompt: a op b as an expression or an imperative, in the pattern and frame."""
    e, v = (rng.choice(forms[op]).format(a=a, b=b) for forms in (EXPRESSIONS, IMPERATIVES))
    return end(frame.format(I=decorate(pattern, pattern.format(e=e, v=v), rng)), rng)


def end(text, rng):
    """Ends a prompt: a punctuation mark, unless it has one, then the newline the response follows."""
    return text + ("" if text[-1] in ".!?:=" else rng.choice(ENDINGS)) + "\n"


def records(task, n, rng, split_words=None, unseen=False, val=False):
    """n (prompt, response) records of a task, each a random phrasing of its family: word tasks on
    split_words (each in a random casing), arith on a in 0..99, b in 0..9 (val=True: the reserved pairs only)."""
    family = phrasings(task, unseen)
    out = []
    while len(out) < n:
        pattern, frame = rng.choice(family)
        if task == "arith":
            a, b, op = rng.randint(0, 99), rng.randint(0, 9), rng.choice("+-")
            if is_val_pair(a, b) == val:
                out.append((arith_prompt(pattern, frame, a, b, op, rng), str(a + b if op == "+" else a - b)))
        else:
            w = cased(rng.choice(split_words), rng)
            out.append((word_prompt(pattern, frame, w, rng), WORD_TASKS[task](w)))
    return out


def task_splits(task, n_train, n_val, seed):
    """{"train", "val", "unseen", "calib"} records of a built-in task. train and val: the training family,
    on training and validation words (or pairs); unseen and calib: the unseen family on validation words
    (calib fits the routers' confidence; unseen measures routing, and is never fitted on)."""
    train_words, val_words = words(seed)
    rng = random.Random(f"{seed}:{task}")  # a str seed is stable across runs, and independent per task
    n_unseen = max(1, n_val // 2)
    return {
        "train": records(task, n_train, rng, train_words),
        "val": records(task, n_val, rng, val_words, val=True),
        "unseen": records(task, n_unseen, rng, val_words, unseen=True, val=True),
        "calib": records(task, n_unseen, rng, val_words, unseen=True, val=True),
    }


TITLES = {  # what a list of one transformation is called in the skills text: descriptive, never an instruction
    "upper": ["Words in capital letters", "The same words in upper case", "Uppercase forms", "In all caps"],
    "lower": ["Words in small letters", "The same words in lower case", "Lowercase forms", "Without capitals"],
    "double": ["Every letter doubled", "Words with each letter twice", "Doubled letters", "Each letter repeated"],
    "reverse": ["Words spelled backwards", "Each word reversed", "In reverse order", "Read from right to left"],
    "count": ["How many letters each word has", "Word lengths", "Letter counts", "The length of each word"],
    "+": ["Sums", "Additions", "Numbers added together", "What they add up to"],
    "-": ["Differences", "Subtractions", "One number minus another", "What is left when taking away"],
}


def skill_documents(seed, n_docs=700, lines=60, titles=True):
    """Text in which the tasks' skills appear with no instruction: `lines` lines of one transformation per
    document, a training word and its upper or lower case, doubled, reversed or length ("Tiger TIGER"), or a
    training sum or difference and its result ("45 + 7 = 52"), every 10 lines under a title that names the
    transformation ("Words in capital letters:"), as a list in a book would be. Only training words and pairs
    appear, so the validation records still test the skill, not recall."""
    train_words = words(seed)[0]
    rng = random.Random(f"{seed}:skills")
    kinds = list(WORD_TASKS) + ["+", "-"]
    docs = []
    for i in range(n_docs):
        op, rows = kinds[i % len(kinds)], []
        while len(rows) < lines:
            if titles and len(rows) % 11 == 0:
                rows.append(rng.choice(TITLES[op]) + ":")
            elif op in WORD_TASKS:
                w = cased(rng.choice(train_words), rng)
                rows.append(f"{w} {WORD_TASKS[op](w)}")
            else:
                a, b = rng.randint(0, 99), rng.randint(0, 9)
                if not is_val_pair(a, b):
                    rows.append(f"{a} {op} {b} = {a + b if op == '+' else a - b}")
        docs.append("\n".join(rows) + "\n")
    return docs
