package jvmtest;

/**
 * Test program for tracer's JVM frame naming (tracer/src/jvm). A thread
 * named "spinner" runs outer -> middle -> inner forever (mostly in inner), so
 * a test can stop it at any moment and find these frames on its stack. A
 * thread named "yielder" calls the native Thread.sleep(0) (a sched_yield)
 * over and over, for frames of a native method. The tests look up
 * the lines marked "@..." below, so the markers must stay on the calls.
 * Changing this file means recapturing the fixtures (see live_tests.rs).
 */
public final class Spin {
    static volatile long sink;

    // A Runnable (not a Thread subclass) so java.lang.Thread.run is on the stack too.
    static final class Task implements Runnable {
        @Override
        public void run() {
            String s = "spin";
            int[] a = {1, 2, 3};
            while (true) {
                outer(s, a); // @run-call
            }
        }
    }

    static final class Yielder implements Runnable {
        @Override
        public void run() {
            while (true) {
                pause(); // @yield-call
            }
        }
    }

    static void pause() {
        try {
            Thread.sleep(0); // @pause-call
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
    }

    public static void main(String[] args) throws Exception {
        Thread t = new Thread(new Task(), "spinner");
        t.start();
        new Thread(new Yielder(), "yielder").start();
        System.out.println("ready");
        t.join();
    }

    // Called over and over (not one endless loop) so the JIT compiles it as
    // a whole method, with middle() inlined, once it is hot.
    static void outer(String s, int[] a) {
        middle(s, a); // @outer-call
    }

    static void middle(String s, int[] a) {
        for (int i = 0; i < 10; i++) { // @middle-loop
            sink += inner(s.length(), a); // @middle-call
        }
    }

    static long inner(int n, int[] a) {
        long x = 0;
        for (int i = 0; i < 10000; i++) {
            x += a[i % a.length] * n + i;
        }
        return x;
    }
}
