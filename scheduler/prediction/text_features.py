"""Hashed TF-IDF features of prompt text: word 1-2-grams, character n-grams and shape tokens.

The text is cut to ``max_chars`` and its whitespace collapsed. Word tokens are runs of
two or more word characters (sklearn's default token pattern) of the lower-cased text;
word unigrams and bigrams hash into ``[0, 2**word_bits)``. Character n-grams
(``char_ngrams = (lo, hi)``, spaces included) are taken from the text as written when
``keep_char_case`` (else lower-cased) and hash into
``[2**word_bits, 2**word_bits + 2**char_bits)``. With ``shape_tokens``, five more tokens
join the word block, each a bucket of one measure of the prompt's shape: its length in
characters and in lines (log2 buckets, over the whole prompt), and the shares of ASCII
digits, punctuation and capitals in the first ``max_chars`` characters (buckets
0, up to 2%, 5%, 10%, 20%, 40%, more). Each block is weighted by sublinear term
frequency (``1 + ln tf``) times smooth inverse document frequency
(``ln((1 + n) / (1 + df)) + 1``) and L2-normalised on its own, like a FeatureUnion of two
TfidfVectorizers. Buckets seen in fewer than ``min_df`` training documents get idf 0,
i.e. they are dropped, as terms outside a vocabulary would be.

Hashing instead of a vocabulary keeps the state to one array (``idf_``) and lets one
request's features be computed with a handful of vectorised numpy operations (a
polynomial rolling hash over the text's code points), which is what keeps single-request
latency well under a millisecond. Collisions are rare at the default sizes (2**18 word
and 2**20 character buckets against a few hundred thousand distinct n-grams).
"""

from __future__ import annotations

import re
import zlib
from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

_WORD = re.compile(r"\w\w+")
_PRIME = np.uint64(1099511628211)  # FNV-64 prime: multiplier of the rolling hash
_MIX1 = np.uint64(0x9E3779B97F4A7C15)
_MIX2 = np.uint64(0xBF58476D1CE4E5B9)
_SHIFT = np.uint64(31)
_BIGRAM_SALT = np.uint64(0x2545F4914F6CDD1D)
_SHAPE_SALT = 7
#: Upper bounds of the share buckets of the shape tokens (digits, punctuation, capitals).
_SHARE_EDGES = (1e-9, 0.02, 0.05, 0.1, 0.2, 0.4)
_DIGITS = bytes(range(48, 58))
_PUNCTUATION = bytes([*range(33, 48), *range(58, 65), *range(91, 97), *range(123, 127)])
_CAPITALS = bytes(range(65, 91))


def _bucket(h: np.ndarray, salt: int, bits: int) -> np.ndarray:
    """Mix 64-bit hashes (wrapping arithmetic) and keep the top ``bits`` bits."""
    x = h ^ np.uint64(salt)
    _mix(x)
    return (x >> np.uint64(64 - bits)).astype(np.int32)


def _mix(x: np.ndarray) -> None:
    """Mix salted 64-bit hashes [n] uint64 in place (wrapping arithmetic)."""
    x *= _MIX1
    x ^= x >> _SHIFT
    x *= _MIX2


#: ``1 + ln(k)`` as float32 for counts k < 2**14 (index 0 unused): a lookup instead of a
#: logarithm per bucket; the values are exactly ``(1.0 + np.log(k)).astype(np.float32)``.
_SUBLINEAR = np.zeros(1 << 14, dtype=np.float32)
_SUBLINEAR[1:] = (1.0 + np.log(np.arange(1, 1 << 14))).astype(np.float32)
_CHAR_SALTS = tuple(np.uint64(16 + n) for n in range(17))


def sublinear_tf(counts: np.ndarray) -> np.ndarray:
    """[m] float32 ``1 + ln(count)`` of counts [m] >= 1."""
    if len(counts) and int(counts.max()) >= len(_SUBLINEAR):
        return (1.0 + np.log(counts)).astype(np.float32)
    return np.take(_SUBLINEAR, counts)


def _code_points(text: str) -> np.ndarray:
    """[chars] uint64 code points of ``text``."""
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)


class HashedTfidf:
    """TF-IDF over hashed word and character n-grams (see the module docstring).

    Parameters are stored as given; ``fit`` learns ``idf_`` [n_features] float32 (0 for
    dropped buckets) and ``n_documents_``. The defaults were chosen on a validation split
    of the training prompts (docs/predictors.md).
    """

    def __init__(
        self,
        *,
        word_bits: int = 18,
        char_bits: int = 20,
        char_ngrams: tuple[int, int] = (1, 5),
        max_chars: int = 1000,
        min_df: int = 2,
        keep_char_case: bool = True,
        shape_tokens: bool = True,
    ) -> None:
        self.word_bits = word_bits
        self.char_bits = char_bits
        self.char_ngrams = char_ngrams
        self.max_chars = max_chars
        self.min_df = min_df
        self.keep_char_case = keep_char_case
        self.shape_tokens = shape_tokens

    # ------------------------------------------------------------------ parameters

    def get_params(self) -> dict[str, Any]:
        return {
            "word_bits": self.word_bits,
            "char_bits": self.char_bits,
            "char_ngrams": list(self.char_ngrams),
            "max_chars": self.max_chars,
            "min_df": self.min_df,
            "keep_char_case": self.keep_char_case,
            "shape_tokens": self.shape_tokens,
        }

    def _check_params(self) -> None:
        lo, hi = self.char_ngrams
        if not (1 <= lo <= hi <= 16):
            raise ValueError(f"char_ngrams must satisfy 1 <= lo <= hi <= 16, got {(lo, hi)}")
        for name in ("word_bits", "char_bits"):
            if not 4 <= getattr(self, name) <= 26:
                raise ValueError(f"{name} must be in [4, 26], got {getattr(self, name)}")
        if self.max_chars < 1 or self.min_df < 1:
            raise ValueError("max_chars and min_df must be >= 1")

    @property
    def n_features(self) -> int:
        return (1 << self.word_bits) + (1 << self.char_bits)

    # ------------------------------------------------------------------ hashing

    def normalise(self, text: str) -> str:
        """The first ``max_chars`` characters, whitespace collapsed (case kept)."""
        # str.split() splits on exactly the characters r"\s" matches (str.isspace), and
        # is several times faster than re.sub + strip
        return " ".join(text[: self.max_chars].split())

    def _shape_values(self, text: str, cased: str) -> list[int]:
        """The shape tokens (module docstring) of ``text`` (the whole prompt) and
        ``cased``, its normalised first ``max_chars`` characters: token ``i`` is
        ``64 * i + its bucket``."""
        ascii_bytes = cased.encode("ascii", "ignore")
        n = max(len(cased), 1)
        values = [
            (len(text) + 1).bit_length() - 1,  # floor(log2(chars + 1))
            min((text.count("\n") + 1).bit_length() - 1, 8),
            *(
                bisect_left(
                    _SHARE_EDGES, (len(ascii_bytes) - len(ascii_bytes.translate(None, kind))) / n
                )
                for kind in (_DIGITS, _PUNCTUATION, _CAPITALS)
            ),
        ]
        return [64 * i + v for i, v in enumerate(values)]

    def _buckets(self, text: str) -> tuple[np.ndarray, int]:
        """(buckets [m] int32 unsorted, m_word): word 1- and 2-grams, shape tokens, then
        character n-grams; the first m_word are in the word block.

        Every hash is salted by its kind (word 1 / 2, shape 7, character n: 16 + n) and
        all of them are mixed in one pass (:func:`_bucket` does the same one kind at a
        time). The hashes are written into one preallocated array."""
        cased = self.normalise(text)
        lower = cased.lower()
        codes = _code_points(cased if self.keep_char_case else lower)
        words = _WORD.findall(lower)
        n_words, n_bigrams = len(words), max(len(words) - 1, 0)
        shape = self._shape_values(text, cased) if self.shape_tokens else []
        n_word = n_words + n_bigrams + len(shape)
        lo, hi = self.char_ngrams
        n_chars = sum(max(len(codes) - n + 1, 0) for n in range(lo, hi + 1))
        x = np.empty(n_word + n_chars, dtype=np.uint64)
        h = x[:n_words]
        h[:] = list(map(zlib.crc32, map(str.encode, words)))
        if n_bigrams:  # a bigram's hash from its two words' hashes
            bigrams = x[n_words : n_words + n_bigrams]
            np.multiply(h[:-1], _PRIME, out=bigrams)
            bigrams += h[1:] ^ _BIGRAM_SALT
            bigrams ^= np.uint64(2)
        h ^= np.uint64(1)
        if shape:
            x[n_words + n_bigrams : n_word] = shape
            x[n_words + n_bigrams : n_word] ^= np.uint64(_SHAPE_SALT)
        start, g = n_word, codes
        for n in range(1, hi + 1):
            if n > 1:  # hash of the n-gram starting at i, from the (n-1)-gram's
                if len(g) <= 1:
                    break  # no n-grams this long (or longer)
                g = g[:-1] * _PRIME
                g += codes[n - 1 :]
            if n >= lo:
                np.bitwise_xor(g, _CHAR_SALTS[n], out=x[start : start + len(g)])
                start += len(g)
        _mix(x)
        x[:n_word] >>= np.uint64(64 - self.word_bits)
        x[n_word:] >>= np.uint64(64 - self.char_bits)
        x[n_word:] += np.uint64(1 << self.word_bits)
        return x.astype(np.int32), n_word

    def bucket_counts(self, text: str) -> tuple[np.ndarray, np.ndarray, int]:
        """(buckets [m] int32 sorted and distinct, their counts [m] int64, m_word): the
        first m_word buckets are word n-grams and shape tokens, the rest character
        n-grams. One in-place sort and a boundary scan (cheaper than ``np.unique``)."""
        x, n_word_raw = self._buckets(text)
        if not len(x):
            return x, np.zeros(0, dtype=np.int64), 0
        x.sort()
        first = np.empty(len(x), dtype=bool)
        first[0] = True
        np.not_equal(x[1:], x[:-1], out=first[1:])
        starts = np.flatnonzero(first)
        counts = np.empty(len(starts), dtype=np.int64)
        np.subtract(starts[1:], starts[:-1], out=counts[:-1])
        counts[-1] = len(x) - starts[-1]
        buckets = x[starts]
        n_word = int(np.searchsorted(buckets, 1 << self.word_bits)) if n_word_raw else 0
        return buckets, counts, n_word

    def term_frequencies(self, text: str) -> tuple[np.ndarray, np.ndarray, int]:
        """(buckets [m] int32 sorted, sublinear tf [m] float32, m_word): the first m_word
        buckets are word n-grams and shape tokens, the rest character n-grams."""
        buckets, counts, n_word = self.bucket_counts(text)
        return buckets, sublinear_tf(counts), n_word

    # ------------------------------------------------------------------ fit / transform

    def _weigh(
        self, buckets: np.ndarray, tf: np.ndarray, n_word: int, drop_zeros: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        values = tf * np.take(self.idf_, buckets)
        for block in (values[:n_word], values[n_word:]):
            norm = float(np.sqrt(block @ block))
            if norm > 0:
                block /= norm
        if not drop_zeros:
            return buckets, values
        keep = values != 0
        return buckets[keep], values[keep]

    def fit(self, texts: Sequence[str] | np.ndarray) -> HashedTfidf:
        self.fit_transform(texts)
        return self

    def fit_transform(self, texts: Sequence[str] | np.ndarray) -> sp.csr_matrix:
        """Learn ``idf_`` from ``texts`` and return their features [n, n_features]."""
        self._check_params()
        if not len(texts):
            raise ValueError("cannot fit text features on zero documents")
        per_doc = [self.term_frequencies(t) for t in texts]
        df = np.bincount(
            np.concatenate([b for b, _, _ in per_doc]), minlength=self.n_features
        ).astype(np.float64)
        n = len(texts)
        idf = np.log((1.0 + n) / (1.0 + df)) + 1.0
        idf[df < self.min_df] = 0.0
        self.idf_ = idf.astype(np.float32)
        self.n_documents_ = n
        return self._matrix([self._weigh(*doc) for doc in per_doc])

    def transform(self, texts: Sequence[str] | np.ndarray) -> sp.csr_matrix:
        """Features [n, n_features] float32 CSR of ``texts`` (needs a fitted ``idf_``)."""
        return self._matrix([self.transform_one(t) for t in texts])

    def transform_one(self, text: str, drop_zeros: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """One text's features: (bucket indices [m] int32, values [m] float32), only the
        non-zero ones unless ``drop_zeros`` is False (then buckets outside the
        vocabulary are kept with value 0: the same dot products, one filter less)."""
        return self._weigh(*self.term_frequencies(text), drop_zeros=drop_zeros)

    def _matrix(self, rows: list[tuple[np.ndarray, np.ndarray]]) -> sp.csr_matrix:
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(idx) for idx, _ in rows], out=indptr[1:])
        indices = np.concatenate([idx for idx, _ in rows]) if rows else np.zeros(0, np.int32)
        data = np.concatenate([v for _, v in rows]) if rows else np.zeros(0, np.float32)
        return sp.csr_matrix((data, indices, indptr), shape=(len(rows), self.n_features))

    # ------------------------------------------------------------------ state

    def get_state(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able parameters, arrays) for the bundle; idf is stored sparsely."""
        active = np.flatnonzero(self.idf_).astype(np.int64)
        params = {**self.get_params(), "n_documents": int(self.n_documents_)}
        return params, {"idf_index": active, "idf_value": self.idf_[active]}

    @classmethod
    def from_state(cls, params: dict[str, Any], arrays: dict[str, np.ndarray]) -> HashedTfidf:
        lo, hi = params["char_ngrams"]
        self = cls(
            word_bits=int(params["word_bits"]),
            char_bits=int(params["char_bits"]),
            char_ngrams=(int(lo), int(hi)),
            max_chars=int(params["max_chars"]),
            min_df=int(params["min_df"]),
            # bundles written before these options existed used neither
            keep_char_case=bool(params.get("keep_char_case", False)),
            shape_tokens=bool(params.get("shape_tokens", False)),
        )
        self._check_params()
        index, value = arrays["idf_index"], arrays["idf_value"]
        if index.shape != value.shape or (len(index) and not 0 <= index.min() <= index.max()):
            raise ValueError("idf arrays are inconsistent")
        if len(index) and index.max() >= self.n_features:
            raise ValueError("idf index out of range for the feature space")
        self.idf_ = np.zeros(self.n_features, dtype=np.float32)
        self.idf_[index] = value
        self.n_documents_ = int(params["n_documents"])
        return self
