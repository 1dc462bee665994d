"""LaplaceRegressor and LaplaceClassifier in scikit-learn pipelines (runs in well under 30 s).

The MLPs' prior precision (and the regression noise) are learned by the Laplace evidence during
training, so there is no regularisation strength to grid-search; ``predict(X, return_std=True)``
gives predictive standard deviations in the target's units.
"""

import numpy as np
import torch
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_breast_cancer, load_diabetes
from sklearn.model_selection import cross_val_score, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from marglik import LaplaceClassifier, LaplaceRegressor

torch.set_num_threads(1)

# regression: diabetes, with predictive standard deviations
X, y = load_diabetes(return_X_y=True)
X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.3, random_state=0)
reg = LaplaceRegressor((50,), epochs=300, evidence_every=30, random_state=0).fit(X_tr, y_tr)
mean, std = reg.predict(X_te, return_std=True)               # noise included
_, std_f = reg.predict(X_te, return_std=True, noise=False)   # the regression function only
inside = np.mean(np.abs(y_te - mean) <= 2 * std)
print(f"diabetes: test R² {reg.score(X_te, y_te):.3f}, noise σ {reg.sigma_noise_:.1f}, "
      f"log evidence {reg.log_marginal_likelihood_:.1f}")
print(f"  mean std {std.mean():.1f} (function only {std_f.mean():.1f}); "
      f"{100 * inside:.0f} % of test targets within ±2 std")

# classification: breast cancer, 3-fold cross-validation inside a pipeline
X, y = load_breast_cancer(return_X_y=True)
clf = make_pipeline(StandardScaler(),
                    LaplaceClassifier((20,), epochs=200, evidence_every=20, random_state=0))
scores = cross_val_score(clf, X, y, cv=3)
print(f"breast cancer: 3-fold accuracy {scores.mean():.3f} ± {scores.std():.3f}")

# mixed columns: one-hot encode a categorical column with a ColumnTransformer
rng = np.random.default_rng(0)
colour = rng.choice(["red", "green", "blue"], size=200)
size = rng.normal(size=200)
target = np.where(colour == "red", 2.0, 0.0) + np.sin(2 * size) + 0.1 * rng.normal(size=200)
X_mixed = np.empty((200, 2), dtype=object)
X_mixed[:, 0], X_mixed[:, 1] = colour, size
pipe = make_pipeline(
    ColumnTransformer([("colour", OneHotEncoder(), [0]), ("size", StandardScaler(), [1])]),
    LaplaceRegressor((20,), epochs=300, evidence_every=30, random_state=0),
).fit(X_mixed, target)
print(f"mixed columns: train R² {pipe.score(X_mixed, target):.3f}, "
      f"learned noise σ {pipe[-1].sigma_noise_:.3f} (true 0.1)")
