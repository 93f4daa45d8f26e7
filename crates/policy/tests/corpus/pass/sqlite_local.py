import sqlite3

con = sqlite3.connect('local.db')
con.execute('create table if not exists t (x integer)')
con.execute('insert into t values (1)')
print(con.execute('select count(*) from t').fetchone())
