"""Self-play: games, PUCT MCTS with batched leaf evaluation, multi-game play, and the selfplay task kind."""
