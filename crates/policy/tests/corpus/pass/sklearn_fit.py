from sklearn.linear_model import LinearRegression
import numpy as np

X = np.arange(10).reshape(-1, 1)
y = 2 * X.ravel() + 1
model = LinearRegression().fit(X, y)
print(model.coef_, model.intercept_)
