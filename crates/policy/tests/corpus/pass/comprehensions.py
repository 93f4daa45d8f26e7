matrix = [[i * j for j in range(5)] for i in range(5)]
transposed = list(zip(*matrix))
flat = {x for row in matrix for x in row}
print(transposed[1], sorted(flat))
