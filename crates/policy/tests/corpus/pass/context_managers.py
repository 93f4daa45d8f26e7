from contextlib import contextmanager

@contextmanager
def section(title):
    print('begin', title)
    yield
    print('end', title)

with section('a'):
    print('inside')
