import pandas as pd

df = pd.read_csv('sales.csv')
summary = df.groupby('region')['amount'].agg(['sum', 'mean'])
print(summary.sort_values('sum', ascending=False).head(10))
