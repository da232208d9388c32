// node-postgres behaviours that must be the same directly and through pgfleet
// (tests/pooler/test_driver_conformance.py). Usage: node conformance.js PORT CASE;
// prints one JSON line describing what the driver saw.
const { Client } = require("pg");

const base = (port) => ({ host: "127.0.0.1", port, user: "postgres", database: "app" });

function ended(client) {
  return new Promise((resolve) => client.once("end", resolve));
}

const cases = {
  // connect() then end() at once: the driver may send Terminate before the startup packet.
  // Directly, neither promise settles; what was seen is printed when node runs out of work.
  quick(port) {
    const client = new Client(base(port));
    const seen = { connect: "pending", end: "pending", errors: [] };
    client.on("error", (err) => seen.errors.push(err.code || err.message));
    client.connect().then(
      () => (seen.connect = "connected"),
      (err) => (seen.connect = `failed: ${err.code || err.message}`),
    );
    client.end().then(
      () => (seen.end = "ended"),
      (err) => (seen.end = `failed: ${err.code || err.message}`),
    );
    return new Promise((resolve) => process.once("beforeExit", () => resolve(seen)));
  },

  // The backend dies under a query: one error for the query, no second one.
  async fatal(port) {
    const client = new Client(base(port));
    const errors = [];
    client.on("error", (err) => errors.push(err.code || err.message));
    await client.connect();
    const end = ended(client);
    let query;
    try {
      await client.query("SELECT pg_terminate_backend(pg_backend_pid())");
      query = "ok";
    } catch (err) {
      query = err.code || err.message;
    }
    await end;
    return { query, errors };
  },

  // Settings node-postgres sends as startup parameters.
  async options(port) {
    const client = new Client({
      ...base(port),
      options: "-c search_path=pg_catalog,public -c work_mem=7MB --lock-timeout=3s",
      statement_timeout: 1234,
      idle_in_transaction_session_timeout: 5678,
      application_name: "conformance",
    });
    await client.connect();
    const show = async () =>
      (
        await client.query(
          "SELECT current_setting('search_path') AS search_path, current_setting('work_mem') AS work_mem," +
            " current_setting('lock_timeout') AS lock_timeout," +
            " current_setting('statement_timeout') AS statement_timeout," +
            " current_setting('idle_in_transaction_session_timeout') AS idle_timeout," +
            " current_setting('application_name') AS application_name",
        )
      ).rows[0];
    const first = await show();
    const again = await show();
    let timeout;
    try {
      await client.query("SELECT pg_sleep(5)");
      timeout = "no timeout";
    } catch (err) {
      timeout = err.code;
    }
    await client.end();
    // Another client on the same server link gets none of it.
    const other = new Client(base(port));
    await other.connect();
    const clean = (
      await other.query(
        "SELECT current_setting('search_path') AS search_path, current_setting('work_mem') AS work_mem," +
          " current_setting('statement_timeout') AS statement_timeout",
      )
    ).rows[0];
    await other.end();
    return { first, again, timeout, clean };
  },
};

cases[process.argv[3]](Number(process.argv[2])).then(
  (result) => console.log(JSON.stringify(result)),
  (err) => {
    console.error(err.stack || String(err));
    process.exit(1);
  },
);
