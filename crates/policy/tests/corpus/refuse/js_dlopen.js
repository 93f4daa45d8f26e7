// expect: javascript.native
const m = { exports: {} };
process.dlopen(m, '/tmp/evil.so');
