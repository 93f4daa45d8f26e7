const fs = require('fs');
const path = require('node:path');
const p = path.join(process.cwd(), 'text.txt');
console.log(fs.existsSync(p) ? fs.readFileSync(p, 'utf8').length : 0);
