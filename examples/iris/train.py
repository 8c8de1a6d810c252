"""Train the iris example in two versions, from the dataset scikit-learn ships.

    python examples/iris/train.py OUT_DIR

writes OUT_DIR/v1/model.joblib (logistic regression) and OUT_DIR/v2/model.joblib (a
random forest), each a model directory the sklearn server can serve.
"""

from __future__ import annotations

import sys
from pathlib import Path


def train(out: Path) -> dict[str, float]:
    import joblib
    from sklearn.datasets import load_iris
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    x, y = load_iris(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=7)
    models = {
        "v1": LogisticRegression(max_iter=500),
        "v2": RandomForestClassifier(n_estimators=50, random_state=7),
    }
    scores = {}
    for name, model in models.items():
        model.fit(x_train, y_train)
        scores[name] = float(model.score(x_test, y_test))
        (out / name).mkdir(parents=True, exist_ok=True)
        joblib.dump(model, out / name / "model.joblib")
    return scores


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "iris-models")
    for version, accuracy in train(target).items():
        print(f"{version}: test accuracy {accuracy:.3f} -> {target / version / 'model.joblib'}")
