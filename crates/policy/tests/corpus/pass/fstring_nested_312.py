names = ['a', 'b']
print(f"{'\n'.join(f'{n!r:>4}' for n in names)}")
