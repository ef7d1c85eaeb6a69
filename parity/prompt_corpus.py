"""The tokenizer gate's prompt corpus: built in code from a seed (no downloads), same seed same list.

    corpus = build_corpus()            # [(category, prompt), ...]
    counts = category_counts(corpus)   # {category: n}

Every category is there to hit one part of CLIP's tokenisation: ordinary captions (the common path,
BPE merges), long prompts (truncation at 77 and the dropped tail), punctuation runs and prompt
weighting syntax, numbers (CLIP splits every digit), apostrophes and contractions (the 's 't 're
've 'm 'll 'd alternatives, uppercase and curly variants), non-Latin scripts (CJK, Japanese kana,
Hangul, Cyrillic, Arabic, Devanagari, Greek with final sigma, Hebrew, Thai: byte-level fallback),
emoji (modifiers, ZWJ sequences, flags, keycaps, variation selectors), accents and combining marks
(NFC vs NFD, stacked marks, compatibility characters NFC keeps), whitespace oddities (tabs,
newlines, NBSP, ideographic space, zero-width characters, U+001C..U+001F, U+0085), special-token
text (the literal "<|endoftext|>" and its near misses), random code points (every assigned
category but surrogates), and mixes of all of these.
"""
from __future__ import annotations

import random
import unicodedata
from collections import Counter

SEED = 19
CATEGORIES = ("caption", "long", "punctuation", "number", "apostrophe", "script", "emoji", "accent",
              "whitespace", "special", "random_codepoints", "mixed")

ADJ = ("red", "tiny", "ancient", "glowing", "misty", "golden", "futuristic", "cozy", "abandoned", "colorful",
       "snowy", "wooden", "giant", "cute", "dramatic", "serene", "rusty", "neon", "minimalist", "ornate",
       "Victorian", "underwater", "psychedelic", "cinematic", "hyperrealistic", "whimsical", "gothic", "sunlit")
NOUN = ("cat", "dog", "fox", "astronaut", "castle", "robot", "dragon", "lighthouse", "forest", "city",
        "teapot", "owl", "samurai", "mountain", "waterfall", "bicycle", "spaceship", "library", "garden",
        "portrait of a woman", "old man", "knight", "jellyfish", "cathedral", "motorcycle", "cupcake", "tiger")
PLACE = ("in the snow", "on the moon", "at sunset", "in a cyberpunk alley", "by the sea", "in a dense jungle",
         "on a rainy street", "in outer space", "inside a cathedral", "under the northern lights",
         "in Tokyo", "on Mars", "in a medieval village", "at the bottom of the ocean", "in a wheat field")
STYLE = ("oil painting", "watercolor", "digital art", "photograph", "35mm film", "trending on artstation",
         "by Greg Rutkowski", "studio lighting", "octane render", "unreal engine 5", "concept art", "8k",
         "highly detailed", "sharp focus", "bokeh", "pencil sketch", "ukiyo-e", "low poly", "isometric",
         "art nouveau", "pixel art", "vaporwave", "matte painting", "HDR", "depth of field")
TEMPLATES = ("a {adj} {noun} {place}", "a photo of a {noun}", "{adj} {noun}, {style}",
             "A {adj} {noun} {place}, {style}, {style2}", "an {adj} {noun}", "{noun} {place}. {style}.",
             "close-up of a {adj} {noun} {place}", "{style} of a {noun} {place}", "The {noun} is {adj}",
             "{adj}, {adj2} {noun} {place}, {style}")

PUNCT = ("!", "?", ".", ",", ";", ":", "-", "_", "(", ")", "[", "]", "{", "}", "<", ">", "|", "/", "\\", "*",
         "&", "^", "%", "$", "#", "@", "~", "`", "\"", "'", "+", "=", "…", "—", "–", "«", "»", "¿", "¡",
         "、", "。", "！", "？", "·", "•", "§", "¶", "†", "‰", "€", "£", "¥", "©", "®", "™", "°")

CONTRACTED = ("don't", "it's", "we're", "they've", "I'm", "you'll", "he'd", "can't", "won't", "isn't",
              "that's", "let's", "y'all", "o'clock", "rock 'n' roll", "O'Brien", "the cat's toy",
              "the dogs' bones", "'twas", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'x", "''", "'''s",
              "'S", "'LL", "DON'T", "IT'S", "I'D'VE", "y'all'd've", "ma'am", "'sup", "'tis", "'90s",
              "rock'n'roll", "don’t", "it’s", "‘quoted’", "`backtick's`", "James's", "'", "a'b'c'd")

SCRIPTS = {  # short phrases, then random letters of the same blocks
    "cjk": ("一只猫在雪地里", "山水画，高清，细节丰富", "龍", "中国古代宫殿", "繁體中文的句子", "漢字と仮名",
            "春夏秋冬"),
    "japanese": ("雪の中の赤いキツネ", "ひらがなとカタカナ", "東京の夜景、ネオン", "かわいい猫", "アニメ風の少女",
                 "ｶﾀｶﾅ半角"),
    "korean": ("눈 속의 붉은 여우", "서울의 밤거리", "한국어 문장입니다", "고양이", "ㄱㄴㄷ ㅏㅑ"),
    "cyrillic": ("Красная лиса в снегу", "портрет девушки, масляная живопись", "Москва ночью", "ЁЖИК В ТУМАНЕ",
                 "Україна, Київ", "Ђорђе"),
    "arabic": ("ثعلب أحمر في الثلج", "مدينة عربية قديمة", "السلام عليكم", "الخط العربي", "٣٤٥ ١٢", "فارسی گربه"),
    "devanagari": ("बर्फ में लाल लोमड़ी", "नमस्ते दुनिया", "हिन्दी वाक्य", "क्षत्रिय", "१२३४"),
    "greek": ("Μια κόκκινη αλεπού στο χιόνι", "ΟΔΟΣ", "ΣΟΦΟΣ ΣΟΦΟΣ", "Αθήνα", "λόγος καὶ ἦθος", "ΆΈΉΊΌΎΏ"),
    "hebrew": ("שועל אדום בשלג", "שָׁלוֹם", "ירושלים", "עברית"),
    "thai": ("สุนัขจิ้งจอกสีแดงในหิมะ", "สวัสดีครับ", "ภาษาไทย", "๑๒๓"),
}
SCRIPT_RANGES = {"cjk": [(0x4E00, 0x9FFF), (0x3400, 0x4DBF)], "japanese": [(0x3041, 0x3096), (0x30A1, 0x30FA)],
                 "korean": [(0xAC00, 0xD7A3), (0x1100, 0x1112)], "cyrillic": [(0x0400, 0x04FF)],
                 "arabic": [(0x0620, 0x064A), (0x0660, 0x0669)], "devanagari": [(0x0900, 0x097F)],
                 "greek": [(0x0370, 0x03FF), (0x1F00, 0x1FFE)], "hebrew": [(0x05D0, 0x05EA), (0x0591, 0x05C7)],
                 "thai": [(0x0E01, 0x0E5B)]}

EMOJI = ("😀", "🐱", "🦊", "🚀", "🌸", "🔥", "❤️", "❤", "✨", "🎨", "🏔️", "👍", "👍🏽", "👩🏿‍🔬", "👨‍👩‍👧‍👦",
         "🧑‍🚀", "🏳️‍🌈", "🏴‍☠️", "👁️‍🗨️", "🇯🇵", "🇫🇷", "🇺🇸🇬🇧", "1️⃣", "#️⃣", "©️", "☕", "🫠", "🧌", "🪐",
         "🐈‍⬛", "❤️‍🔥", "🙂‍↔️", "💯", "🤷‍♀️", "🏴󠁧󠁢󠁳󠁣󠁴󠁿", "⚡", "☀︎", "♀︎")

ACCENTED = ("café", "cafe\u0301", "naïve", "nai\u0308ve", "Ångström", "\u212bngstr\u00f6m", "Zoë", "crème brûlée",
            "señor", "São Paulo", "Tiếng Việt", "Đà Nẵng", "Łódź", "Çağrı", "Ærøskøbing", "straße", "STRASSE",
            "ﬁligree", "ＡＢＣ ｆｕｌｌｗｉｄｔｈ", "Ǆ ǅ ǆ", "ﬀ ﬃ", "İstanbul", "ıi", "K\u0327", "a\u0300\u0301\u0302",
            "Z\u0351\u0308\u0350a\u0327\u0324l\u0316g\u0353o\u0358", "e\u0301\u0301", "\u0301leading mark",
            "Å vs A\u030a", "ǖ vs u\u0308\u0304", "ñ vs n\u0303", "x\u20dd", "①②③", "Ⅻ", "ℌ𝔢𝔩𝔩𝔬", "𝐛𝐨𝐥𝐝",
            "ﾊﾝｶｸ", "㎞ ㍻", "µ vs μ", "Ω vs Ω")

WHITESPACE = ("\t", "\n", "\r\n", "\r", "\x0b", "\x0c", "\xa0", "\u1680", "\u2000", "\u2003", "\u2009", "\u200a",
              "\u2028", "\u2029", "\u202f", "\u205f", "\u3000", "\x85", "\u200b", "\u200c", "\u200d", "\u2060",
              "\ufeff", "\u180e", "\x1c", "\x1d", "\x1e", "\x1f", "\x00", "\x7f", "  ", "   \t\n  ")

SPECIAL = ("<|endoftext|>", "<|startoftext|>", "<|ENDOFTEXT|>", "<|EndOfText|>", "<|startoftext|>a<|endoftext|>",
           "< |endoftext| >", "<|endoftext", "endoftext|>", "<|endofte|>", "<<|endoftext|>>", "<|endoftext|>|>",
           "<||endoftext||>", "<|endoftext|><|endoftext|>", "<|startoftext|><|startoftext|>", "<|>", "<||>",
           "<|pad|>", "<unk>", "</w>", "a</w>b", "<|endoftext|​>", "<|endoftext|>\u0301", "[CLS] [SEP]",
           "<s></s>")

LATIN_WORDS = tuple(w for p in ADJ + NOUN + PLACE + STYLE for w in p.split())


def _caption(r: random.Random) -> str:
    t = r.choice(TEMPLATES)
    return t.format(adj=r.choice(ADJ), adj2=r.choice(ADJ), noun=r.choice(NOUN), place=r.choice(PLACE),
                    style=r.choice(STYLE), style2=r.choice(STYLE))


def _long(r: random.Random) -> str:
    kind = r.randrange(4)
    if kind == 0:  # a tag list, as SD prompts are written
        return ", ".join(r.choice(STYLE + ADJ + NOUN) for _ in range(r.randint(30, 90)))
    if kind == 1:  # sentences
        return " ".join(_caption(r) + "." for _ in range(r.randint(8, 25)))
    if kind == 2:  # one long run that BPE splits into many tokens
        return r.choice(("a", "ab", "xyz", "7", "!", "猫", "🦊")) * r.randint(40, 200)
    # exactly around the 75-token window: 70..80 single-token words
    return " ".join(r.choice(("a", "cat", "dog", "red", "blue", "big", "the", "of")) for _ in range(r.randint(70, 80)))


def _punctuation(r: random.Random) -> str:
    kind = r.randrange(5)
    if kind == 0:
        return "".join(r.choice(PUNCT) for _ in range(r.randint(1, 12)))
    if kind == 1:  # prompt weighting syntax
        w = r.choice(NOUN)
        return r.choice((f"(({w}))", f"[{w}]", f"({w}:1.{r.randint(0, 9)})", f"{{{{{w}}}}}", f"<lora:{w}:0.8>",
                         f"{w}++", f"{w}--", f"[{w}:{r.choice(NOUN)}:0.5]", f"{w} AND {r.choice(NOUN)}", f"{w}|{w}"))
    if kind == 2:
        return f"{_caption(r)}{r.choice(PUNCT) * r.randint(2, 6)}"
    if kind == 3:
        return r.choice(("https://example.com/a_b-c?x=1&y=2", "user@example.org", "C:\\path\\to\\file.png",
                         "#hashtag #sd15", "@mention", "snake_case_name", "kebab-case-name", "CamelCaseName",
                         "...", "?!?!", "!!!!!!!!", "--no-thing", "a.b.c", "e.g.", "i.e.,", "8-bit", "x-ray"))
    return " ".join(r.choice(PUNCT) + r.choice(LATIN_WORDS) + r.choice(PUNCT) for _ in range(r.randint(1, 6)))


def _number(r: random.Random) -> str:
    kind = r.randrange(6)
    if kind == 0:
        return str(r.randint(0, 10 ** r.randint(1, 12)))
    if kind == 1:
        return f"{r.uniform(-1000, 1000):.{r.randint(1, 6)}f}"
    if kind == 2:
        return r.choice(("1920x1080", "4k", "8K UHD", "1,000,000", "3.14159", "1e-5", "2024-05-01", "v1.5",
                         "50mm f/1.8", "ISO 100", "1/250s", "#ff00aa", "0x1F", "½ ¾ ⅓", "x² y³", "٣٤٥", "१२३",
                         "๑๒๓", "①", "Ⅻ", "10%", "$9.99", "€5", "-12.5", "+3", "1st 2nd 3rd 4th", "00:12:59",
                         "1990s", "24/7", "A4", "R2-D2", "C-3PO", "mp4", "h264"))
    if kind == 3:
        return f"{r.choice(NOUN)} {r.randint(1, 9999)} {r.choice(('steps', 'px', 'cm', 'years', '%'))}"
    if kind == 4:
        return "".join(r.choice("0123456789.,-+eE") for _ in range(r.randint(1, 20)))
    return f"seed {r.randint(0, 2 ** 32)}, cfg {r.randint(1, 20)}.{r.randint(0, 9)}, {r.randint(256, 1024)}x{r.randint(256, 1024)}"


def _apostrophe(r: random.Random) -> str:
    kind = r.randrange(3)
    if kind == 0:
        return r.choice(CONTRACTED)
    if kind == 1:
        return f"{r.choice(CONTRACTED)} {_caption(r)} {r.choice(CONTRACTED)}"
    return r.choice(LATIN_WORDS) + r.choice(("'", "’", "''", "'s", "'S", "'t", "'ll", "'d", "'re")) + \
        r.choice(("", "s", "t", "ll", "x", r.choice(LATIN_WORDS)))


def _random_letters(r: random.Random, script: str, n: int) -> str:
    out = []
    while len(out) < n:
        lo, hi = r.choice(SCRIPT_RANGES[script])
        c = chr(r.randint(lo, hi))
        if unicodedata.category(c) != "Cn":
            out.append(c)
    return "".join(out)


def _script(r: random.Random, script: str) -> str:
    kind = r.randrange(4)
    if kind == 0:
        return r.choice(SCRIPTS[script])
    if kind == 1:
        return " ".join(_random_letters(r, script, r.randint(1, 8)) for _ in range(r.randint(1, 5)))
    if kind == 2:  # mixed with Latin, as real prompts do
        return f"{_caption(r)}, {r.choice(SCRIPTS[script])}"
    return r.choice(SCRIPTS[script]).upper() + " " + _random_letters(r, script, r.randint(1, 20))


def _emoji(r: random.Random) -> str:
    kind = r.randrange(3)
    if kind == 0:
        return r.choice(EMOJI)
    if kind == 1:
        return "".join(r.choice(EMOJI) for _ in range(r.randint(2, 8)))
    return f"{_caption(r)} {r.choice(EMOJI)}{r.choice(EMOJI)}"


def _accent(r: random.Random) -> str:
    kind = r.randrange(3)
    if kind == 0:
        return r.choice(ACCENTED)
    if kind == 1:
        form = r.choice(("NFC", "NFD", "NFKC", "NFKD"))
        return unicodedata.normalize(form, r.choice(ACCENTED) + " " + _caption(r))
    base = r.choice(LATIN_WORDS)
    return "".join(c + "".join(chr(r.randint(0x300, 0x36F)) for _ in range(r.randint(0, 3))) for c in base)


def _whitespace(r: random.Random) -> str:
    words = _caption(r).split(" ")
    kind = r.randrange(3)
    if kind == 0:
        return "".join(w + r.choice(WHITESPACE) for w in words)
    if kind == 1:
        return r.choice(WHITESPACE) * r.randint(1, 3) + " ".join(words) + r.choice(WHITESPACE) * r.randint(0, 3)
    return "".join(r.choice(WHITESPACE + ("a", "b", " ")) for _ in range(r.randint(0, 10)))


def _special(r: random.Random) -> str:
    kind = r.randrange(3)
    if kind == 0:
        return r.choice(SPECIAL)
    if kind == 1:
        words = _caption(r).split(" ")
        k = r.randrange(len(words) + 1)
        return " ".join(words[:k] + [r.choice(SPECIAL)] + words[k:])
    return "".join(r.choice(SPECIAL + (" ", "a", "x ")) for _ in range(r.randint(2, 40)))


def _random_codepoints(r: random.Random) -> str:
    out, n = [], r.randint(1, 12)
    while len(out) < n:
        c = chr(r.choice((r.randint(0, 0x2FFF), r.randint(0, 0xFFFF), r.randint(0, 0x10FFFF))))
        if unicodedata.category(c) not in ("Cs", "Cn"):  # lone surrogates are no text; see the module doc
            out.append(c)
    return "".join(out)


def _mixed(r: random.Random) -> str:
    makers = [m for name, m in MAKERS.items() if name != "mixed"]
    return r.choice(("", " ", ", ", "")).join(r.choice(makers)(r) for _ in range(r.randint(2, 5)))


MAKERS = {"caption": _caption, "long": _long, "punctuation": _punctuation, "number": _number,
          "apostrophe": _apostrophe, "emoji": _emoji, "accent": _accent, "whitespace": _whitespace,
          "special": _special, "random_codepoints": _random_codepoints, "mixed": _mixed}
COUNTS = {"caption": 1200, "long": 300, "punctuation": 400, "number": 400, "apostrophe": 400, "script": 1350,
          "emoji": 300, "accent": 400, "whitespace": 400, "special": 300, "random_codepoints": 400, "mixed": 500}


def build_corpus(seed: int = SEED, scale: float = 1.0) -> list[tuple[str, str]]:
    """[(category, prompt)]: every fixed phrase of each list once, then seeded random ones up to
    COUNTS[category] * scale (the script category split evenly over the nine scripts)."""
    r = random.Random(seed)
    out: list[tuple[str, str]] = [("whitespace", "")]  # the empty prompt (SD's unconditional input)
    fixed = {"punctuation": PUNCT, "apostrophe": CONTRACTED, "emoji": EMOJI, "accent": ACCENTED,
             "whitespace": WHITESPACE, "special": SPECIAL}
    for cat in CATEGORIES:
        n = max(1, round(COUNTS[cat] * scale))
        if cat == "script":
            for script, phrases in SCRIPTS.items():
                out += [("script", p) for p in phrases]
                out += [("script", _script(r, script)) for _ in range(max(1, n // len(SCRIPTS)))]
            continue
        out += [(cat, p) for p in fixed.get(cat, ())]
        out += [(cat, MAKERS[cat](r)) for _ in range(n)]
    return out


def category_counts(corpus: list[tuple[str, str]]) -> dict[str, int]:
    c = Counter(cat for cat, _ in corpus)
    return {cat: c[cat] for cat in CATEGORIES}
