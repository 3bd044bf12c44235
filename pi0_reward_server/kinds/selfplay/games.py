"""Two-player games behind one small interface, with fixed-shape encodings for networks.

A state is immutable; ``game.next_state(state, action)`` returns a new one.
``state.to_play`` is the player (0 or 1) who moves next: in Dots and Boxes a
player who completes a box moves again, so it does not simply alternate.

``encode(state)`` is a float32 vector of length ``game.obs_dim`` seen from the
player to move (their marks first), so one network serves both sides.
``outcome(state)`` of a terminal state is +1, -1 or 0 from player 0's view.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

MAX_CONNECT4_SIDE = 12
MAX_DOTS_BOXES_SIDE = 6


class Game(Protocol):
    name: str
    num_actions: int
    obs_dim: int

    def initial_state(self): ...
    def legal_mask(self, state) -> np.ndarray: ...
    def next_state(self, state, action: int): ...
    def terminal(self, state) -> bool: ...
    def outcome(self, state) -> float: ...
    def encode(self, state) -> np.ndarray: ...
    def may_end_next(self, state) -> bool: ...


# -- Connect Four --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class C4State:
    board: np.ndarray  # (rows, cols) int8: 0 empty, 1 player 0, 2 player 1; row 0 is the bottom
    heights: np.ndarray  # (cols,) pieces per column
    to_play: int
    winner: int  # -1 none yet, 0 or 1
    moves: int


class ConnectFour:
    """Drop pieces into columns; four in a row (any direction) wins; a full board is a draw."""

    def __init__(self, rows: int = 6, cols: int = 7, connect: int = 4) -> None:
        if not (4 <= rows <= MAX_CONNECT4_SIDE and 4 <= cols <= MAX_CONNECT4_SIDE):
            raise ValueError(f"connect4 board must be 4-{MAX_CONNECT4_SIDE} rows and columns, got {rows}x{cols}")
        self.rows, self.cols, self.connect = rows, cols, connect
        self.name = f"connect4_{rows}x{cols}"
        self.num_actions = cols
        self.obs_dim = 2 * rows * cols

    def initial_state(self) -> C4State:
        return C4State(np.zeros((self.rows, self.cols), np.int8), np.zeros(self.cols, np.int8), 0, -1, 0)

    def legal_mask(self, state: C4State) -> np.ndarray:
        if state.winner >= 0:
            return np.zeros(self.cols, bool)
        return state.heights < self.rows

    def next_state(self, state: C4State, action: int) -> C4State:
        if not 0 <= action < self.cols or state.heights[action] >= self.rows or state.winner >= 0:
            raise ValueError(f"illegal move {action} in {self.name}")
        board, heights = state.board.copy(), state.heights.copy()
        row = int(heights[action])
        board[row, action] = state.to_play + 1
        heights[action] += 1
        winner = state.to_play if self._wins(board, row, action) else -1
        return C4State(board, heights, 1 - state.to_play, winner, state.moves + 1)

    def _wins(self, board: np.ndarray, row: int, col: int) -> bool:
        piece = board[row, col]
        for dr, dc in ((0, 1), (1, 0), (1, 1), (1, -1)):  # horizontal, vertical, two diagonals
            count = 1
            for sign in (1, -1):
                r, c = row + sign * dr, col + sign * dc
                while 0 <= r < self.rows and 0 <= c < self.cols and board[r, c] == piece:
                    count += 1
                    r, c = r + sign * dr, c + sign * dc
            if count >= self.connect:
                return True
        return False

    def terminal(self, state: C4State) -> bool:
        return state.winner >= 0 or state.moves == self.rows * self.cols

    def outcome(self, state: C4State) -> float:
        return 0.0 if state.winner < 0 else (1.0 if state.winner == 0 else -1.0)

    def may_end_next(self, state: C4State) -> bool:
        """Whether some move could end the game: the mover has connect - 1 pieces down, or one cell is left."""
        return state.moves >= 2 * (self.connect - 1) or state.moves == self.rows * self.cols - 1

    def encode(self, state: C4State) -> np.ndarray:
        mine = state.board == state.to_play + 1
        theirs = state.board == 2 - state.to_play
        return np.concatenate([mine.ravel(), theirs.ravel()]).astype(np.float32)


# -- Dots and Boxes ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DBState:
    edges: np.ndarray  # (num_actions,) bool: horizontal edges first, then vertical
    owners: np.ndarray  # (rows, cols) int8: 0 unclaimed, 1 player 0, 2 player 1
    scores: tuple[int, int]
    to_play: int


class DotsAndBoxes:
    """Draw edges between dots; completing a box scores it and moves again; most boxes wins.

    Edge numbering: horizontal edge (r, c) for r in 0..rows, c in 0..cols-1 is
    ``r * cols + c``; vertical edge (r, c) for r in 0..rows-1, c in 0..cols is
    ``(rows + 1) * cols + r * (cols + 1) + c``. Box (r, c) is bounded by
    horizontal edges (r, c) and (r + 1, c) and vertical edges (r, c) and (r, c + 1).
    """

    def __init__(self, rows: int = 3, cols: int = 3) -> None:
        if not (1 <= rows <= MAX_DOTS_BOXES_SIDE and 1 <= cols <= MAX_DOTS_BOXES_SIDE):
            raise ValueError(f"dots_boxes board must be 1-{MAX_DOTS_BOXES_SIDE} boxes a side, got {rows}x{cols}")
        self.rows, self.cols = rows, cols
        self.name = f"dots_boxes_{rows}x{cols}"
        self.n_horizontal = (rows + 1) * cols
        self.num_actions = self.n_horizontal + rows * (cols + 1)
        self.obs_dim = self.num_actions + 2 * rows * cols + 1
        # The four edges of each box, and the boxes each edge borders.
        self.box_edges = np.array([
            [r * cols + c, (r + 1) * cols + c, self.n_horizontal + r * (cols + 1) + c, self.n_horizontal + r * (cols + 1) + c + 1]
            for r in range(rows) for c in range(cols)
        ])
        self.edge_boxes: list[list[int]] = [[] for _ in range(self.num_actions)]
        for box, edges in enumerate(self.box_edges):
            for edge in edges:
                self.edge_boxes[edge].append(box)

    def initial_state(self) -> DBState:
        return DBState(np.zeros(self.num_actions, bool), np.zeros((self.rows, self.cols), np.int8), (0, 0), 0)

    def legal_mask(self, state: DBState) -> np.ndarray:
        return ~state.edges

    def next_state(self, state: DBState, action: int) -> DBState:
        if not 0 <= action < self.num_actions or state.edges[action]:
            raise ValueError(f"illegal move {action} in {self.name}")
        edges = state.edges.copy()
        edges[action] = True
        owners = state.owners
        completed = [b for b in self.edge_boxes[action] if edges[self.box_edges[b]].all()]
        scores = list(state.scores)
        if completed:
            owners = owners.copy()
            for box in completed:
                owners.flat[box] = state.to_play + 1
            scores[state.to_play] += len(completed)
        to_play = state.to_play if completed else 1 - state.to_play  # a completed box earns another move
        return DBState(edges, owners, (scores[0], scores[1]), to_play)

    def terminal(self, state: DBState) -> bool:
        return bool(state.edges.all())

    def outcome(self, state: DBState) -> float:
        return float(np.sign(state.scores[0] - state.scores[1]))

    def may_end_next(self, state: DBState) -> bool:
        return int((~state.edges).sum()) == 1

    def encode(self, state: DBState) -> np.ndarray:
        mine = (state.owners == state.to_play + 1).ravel()
        theirs = (state.owners == 2 - state.to_play).ravel()
        lead = (state.scores[state.to_play] - state.scores[1 - state.to_play]) / (self.rows * self.cols)
        return np.concatenate([state.edges, mine, theirs, [lead]]).astype(np.float32)


GAMES = {"connect4": ConnectFour, "dots_boxes": DotsAndBoxes}
DEFAULT_SIZES = {"connect4": (6, 7), "dots_boxes": (3, 3)}


def make_game(name: str, rows: int | None = None, cols: int | None = None) -> Game:
    if name not in GAMES:
        raise ValueError(f"unknown game {name!r}; known: {sorted(GAMES)}")
    default_rows, default_cols = DEFAULT_SIZES[name]
    return GAMES[name](rows or default_rows, cols or default_cols)
