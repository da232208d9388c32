// pgjdbc through pgfleet past prepareThreshold: server-side prepared statements
// (S_1, S_2, ...) from many connections over few servers.
// Usage: java -cp postgresql.jar Named.java PORT CLIENTS ROUNDS
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.atomic.AtomicInteger;

public class Named {
    public static void main(String[] args) throws Exception {
        int port = Integer.parseInt(args[0]);
        int clients = Integer.parseInt(args[1]);
        int rounds = Integer.parseInt(args[2]);
        String url = "jdbc:postgresql://127.0.0.1:" + port + "/app?user=postgres&prepareThreshold=2";
        AtomicInteger done = new AtomicInteger();
        List<Throwable> errors = new ArrayList<>();
        List<Thread> threads = new ArrayList<>();
        for (int c = 0; c < clients; c++) {
            final int id = c;
            Thread t = new Thread(() -> {
                try (Connection conn = DriverManager.getConnection(url)) {
                    for (int r = 0; r < rounds; r++) {
                        for (int k = 0; k < 5; k++) {
                            try (PreparedStatement ps = conn.prepareStatement("SELECT ?::int + " + k)) {
                                ps.setInt(1, id);
                                try (ResultSet rs = ps.executeQuery()) {
                                    rs.next();
                                    if (rs.getInt(1) != id + k) throw new IllegalStateException("wrong result");
                                }
                            }
                            done.incrementAndGet();
                        }
                        conn.setAutoCommit(false);
                        try (PreparedStatement ps = conn.prepareStatement("SELECT ?::text || 'x'")) {
                            ps.setString(1, "r" + r);
                            try (ResultSet rs = ps.executeQuery()) {
                                rs.next();
                                if (!rs.getString(1).equals("r" + r + "x")) throw new IllegalStateException("wrong text");
                            }
                        }
                        conn.commit();
                        conn.setAutoCommit(true);
                    }
                } catch (Throwable e) {
                    synchronized (errors) { errors.add(e); }
                }
            });
            threads.add(t);
            t.start();
        }
        for (Thread t : threads) t.join();
        if (!errors.isEmpty()) {
            errors.get(0).printStackTrace();
            System.exit(1);
        }
        System.out.println("ok " + done.get());
    }
}
