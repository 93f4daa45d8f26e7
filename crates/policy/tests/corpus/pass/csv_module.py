import csv

rows = []
with open('data.csv', newline='') as f:
    for row in csv.DictReader(f):
        rows.append(row)
print(len(rows))
