"""The probes' regressions in float64 torch (no sklearn): least squares and L2 logistic regression, cross-validated.

Wang & Chen (EMNLP 2020) probe a position table with scikit-learn's ``LinearRegression`` (least squares with an
intercept; the minimum-norm solution when there are more features than rows) and ``LogisticRegression`` (L2
penalty 1/2 |w|^2 with C = 1). The same estimators are written here in a few lines each.
"""

import torch

from ..errors import PosSwapError


def least_squares(x: torch.Tensor, y: torch.Tensor, ridge: float = 0.0):
    """``(w, b)`` minimising |x w + b - y|^2 + lambda |w|^2 for ``x (N, D)``, ``y (N,)``: x and y are centred (the
    intercept). ``ridge`` = 0 is ``LinearRegression`` (the minimum-norm solution when D >= N); otherwise
    lambda = ridge * trace(X'X) / D, a penalty relative to the features' scale (hidden states differ per layer)."""
    x, y = x.double(), y.double()
    x_mean, y_mean = x.mean(dim=0), y.mean()
    xc, yc = x - x_mean, y - y_mean
    if ridge > 0:
        gram = xc.T @ xc
        gram = gram + ridge * gram.trace() / x.shape[1] * torch.eye(x.shape[1], dtype=x.dtype)
        w = torch.linalg.solve(gram, xc.T @ yc)
    else:
        w = torch.linalg.lstsq(xc, yc[:, None], driver="gelsd").solution[:, 0]
    return w, y_mean - x_mean @ w


def logistic_regression(x: torch.Tensor, y: torch.Tensor, penalty: float = 1.0, steps: int = 50, tol: float = 1e-10):
    """``(w, b)`` minimising sum_i log(1 + exp(-s_i (x_i w + b))) + penalty/2 |w|^2 (s = +-1 from ``y`` in {0, 1};
    the intercept is not penalised) by Newton's method in float64."""
    x = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)  # (N, D + 1)
    y = y.double()
    reg = torch.full((x.shape[1],), float(penalty), dtype=torch.float64)
    reg[-1] = 0.0
    theta = torch.zeros(x.shape[1], dtype=torch.float64)
    for _ in range(steps):
        p = torch.sigmoid(x @ theta)
        gradient = x.T @ (p - y) + reg * theta
        hessian = (x.T * (p * (1 - p))) @ x + torch.diag(reg) + 1e-12 * torch.eye(len(theta), dtype=torch.float64)
        step = torch.linalg.solve(hessian, gradient)
        theta = theta - step
        if step.abs().max() < tol:
            break
    return theta[:-1], theta[-1]


def folds_of(groups: torch.Tensor, folds: int, seed: int) -> list[torch.Tensor]:
    """Boolean test masks of ``folds`` folds over the distinct values of ``groups`` (e.g. positions: every row of a
    held-out position is tested, none trained on), shuffled by ``seed``."""
    values = groups.unique()
    if len(values) < 2 * folds:
        raise PosSwapError(
            f"{len(values)} positions are too few for {folds}-fold cross-validation (need at least {2 * folds}); "
            f"use fewer folds or more positions."
        )
    order = values[torch.randperm(len(values), generator=torch.Generator().manual_seed(seed))]
    return [torch.isin(groups, chunk) for chunk in order.chunk(folds)]


def absolute_position_probe(features: torch.Tensor, positions: torch.Tensor, folds: int = 5, seeds: int = 5,
                            ridge: float = 0.0) -> dict:  # fmt: skip
    """Wang & Chen's absolute probe: regress the position from each row, k-fold cross-validated over positions,
    mean |round(prediction) - position| on the held-out folds; mean and std over ``seeds`` shuffles. Predictions
    are clamped to the range of positions, so a few outlier rows (a sink token's huge activations in the hidden
    states) cannot push the error past that of predicting the mean."""
    maes = []
    low, high = positions.min().item(), positions.max().item()
    for seed in range(seeds):
        errors = torch.zeros(len(positions), dtype=torch.float64)
        for test in folds_of(positions, folds, seed):
            w, b = least_squares(features[~test], positions[~test].double(), ridge)
            prediction = (features[test].double() @ w + b).clamp(low, high).round()
            errors[test] = (prediction - positions[test].double()).abs()
        maes.append(errors.mean().item())
    return _spread("absolute_mae", maes)


def relative_order_probe(table: torch.Tensor, pairs: int = 8192, folds: int = 5, seeds: int = 5,
                         penalty: float = 1.0) -> dict:  # fmt: skip
    """Wang & Chen's relative probe: logistic regression on concatenated rows ``[e_i, e_j]`` (i != j) predicting
    whether i < j, k-fold cross-validated over random pairs; error rate, mean and std over ``seeds``."""
    if len(table) < 2:
        raise PosSwapError(f"The relative-order probe needs at least 2 positions; the table has {len(table)}.")
    table = table.double()
    rates = []
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(seed)
        first = torch.randint(0, len(table), (pairs,), generator=generator)
        second = (first + torch.randint(1, len(table), (pairs,), generator=generator)) % len(table)  # != first
        x, y = torch.cat([table[first], table[second]], dim=1), (first < second).double()
        wrong = 0
        for test in folds_of(torch.arange(pairs), folds, seed):
            w, b = logistic_regression(x[~test], y[~test], penalty)
            wrong += ((x[test] @ w + b > 0).double() != y[test]).sum().item()
        rates.append(wrong / pairs)
    return _spread("relative_error", rates)


def _spread(name: str, values: list[float]) -> dict:
    tensor = torch.tensor(values, dtype=torch.float64)
    std = tensor.std().item() if len(values) > 1 else 0.0
    return {name: tensor.mean().item(), f"{name}_std": std, f"{name}_per_seed": values}
