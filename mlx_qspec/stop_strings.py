"""Stop strings found in text that arrives piece by piece, in time linear in the text.

A server streams text as the model makes it, so it must know after every piece whether a
stop string has ended the text, and how much of the tail to hold back because it could still
become one. Rescanning the text (or every prefix of every stop string) at each piece costs
time quadratic in their lengths on the engine's thread, which every request shares. Here each
stop string keeps a Knuth-Morris-Pratt state — the length of its longest prefix the text
ends with — so each character costs amortized O(1) per stop string, and that state is
exactly the tail to hold back.
"""


def _failure(s: str) -> list:
    """KMP's failure function: ``f[i]`` is the longest proper border of ``s[:i + 1]``."""
    f, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = f[k - 1]
        if s[i] == s[k]:
            k += 1
        f[i] = k
    return f


class StopMatcher:
    """The first occurrence of any of ``stops`` (non-empty strings) in the text fed so far.

    Which stop string ends the text, and where, does not depend on how the text was cut
    into pieces: the first character at which some stop string is complete ends it, and of
    the stop strings complete there the longest (it starts first) sets the cut."""

    def __init__(self, stops: list):
        if not all(stops):
            raise ValueError("stop strings must be non-empty")
        self.stops = list(stops)
        self.failures = [_failure(s) for s in self.stops]
        self.states = [0] * len(self.stops)

    def feed(self, piece: str):
        """Advance over ``piece``. Returns where the first stop string starts, as an offset
        into ``piece`` (negative: it began in earlier pieces), or None when none is complete
        yet; then :attr:`partial` says how long a tail could still become one."""
        for at, c in enumerate(piece):
            found = 0
            for i, (s, f) in enumerate(zip(self.stops, self.failures)):
                k = self.states[i]
                while k and s[k] != c:
                    k = f[k - 1]
                if s[k] == c:
                    k += 1
                if k == len(s):
                    found = max(found, k)
                    k = f[k - 1]
                self.states[i] = k
            if found:
                return at + 1 - found
        return None

    @property
    def partial(self) -> int:
        """Characters at the end of the text that begin some stop string."""
        return max(self.states, default=0)
