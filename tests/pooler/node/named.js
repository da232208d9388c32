// node-postgres named queries through pgfleet: many clients, few servers.
// Usage: node named.js PORT CLIENTS ROUNDS; prints "ok N" or exits non-zero.
const { Client } = require("pg");

async function worker(port, id, rounds) {
  const client = new Client({ host: "127.0.0.1", port, user: "postgres", database: "app" });
  await client.connect();
  let done = 0;
  try {
    for (let r = 0; r < rounds; r++) {
      for (let k = 0; k < 10; k++) {
        const res = await client.query({ name: `q${k}`, text: `SELECT $1::int + ${k} AS v`, values: [id] });
        if (res.rows[0].v !== id + k) throw new Error(`wrong result ${res.rows[0].v}`);
        done++;
      }
    }
  } finally {
    await client.end();
  }
  return done;
}

async function main() {
  const [port, clients, rounds] = process.argv.slice(2).map(Number);
  const counts = await Promise.all(Array.from({ length: clients }, (_, i) => worker(port, i, rounds)));
  console.log(`ok ${counts.reduce((a, b) => a + b, 0)}`);
}

main().catch((err) => {
  console.error(err.stack || String(err));
  process.exit(1);
});
