// expect: javascript.process
const { Worker } = require('worker_threads');
new Worker('process.exit(0)', { eval: true });
