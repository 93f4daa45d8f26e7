const log = '2026-11-30 started';
const m = /^(\d{4})-(\d{2})-(\d{2})/.exec(log);
console.log(m ? m.slice(1).map(Number) : null);
